"""The ``llmpipe`` command: a Unix filter with zstd/xz conventions.

Exit codes: 0 success, 1 error (one line on stderr, no traceback). With no
file argument it filters stdin to stdout; ``FILE`` compresses to
``FILE.llmp``; ``-d FILE.llmp`` restores ``FILE``. An output file is written
as ``TARGET.part`` and renamed only after the whole stream was written
(compression) or verified (decompression). On an error or Ctrl-C the part
file is removed, unless ``--resume`` was given: then it stays, and the same
command with ``--resume`` continues from it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from llmpipe import __version__
from llmpipe.defaults import (
    ALL_THREADS,
    DEFAULT_BATCH,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_CONTEXT,
    DEFAULT_OVERLAP,
    DEFAULT_STEER,
    DEFAULT_STEER_EPOCHS,
    DEFAULT_STEER_SECONDS,
    FLOAT_DTYPES,
)
from llmpipe.errors import DamagedArchiveError, LlmpipeError, UsageError

SUFFIX = ".llmp"
PART_SUFFIX = ".part"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llmpipe",
        description="Lossless compression with a language model driving a range coder.",
        epilog="Commands: `llmpipe fetch [MODEL]` puts a model into the cache; `llmpipe models [--plan MODEL | "
        "--remove NAME]` lists the cache, removes a model, or plans a model's memory without loading it.",
    )
    p.add_argument("files", nargs="*", metavar="FILE", help="files to process (none or '-': stdin to stdout)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("-z", "--compress", action="store_true", help="compress (the default)")
    mode.add_argument("-d", "--decompress", action="store_true", help="decompress")
    mode.add_argument("-t", "--test", action="store_true", help="decode and verify archives, write nothing")
    mode.add_argument("-l", "--list", action="store_true", help="describe archives from their index (no model)")
    p.add_argument("-c", "--stdout", action="store_true", help="write to standard output")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE (one input only)")
    p.add_argument("-k", "--keep", action="store_true", help="keep input files (the default)")
    p.add_argument("--rm", action="store_true", help="remove each input file after its output is verified and synced")
    p.add_argument(
        "-f", "--force", action="store_true", help="overwrite outputs; allow terminals; accept numeric mismatches"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print no warnings or progress")
    p.add_argument("-v", "--verbose", action="store_true", help="print statistics (with -l: every block)")
    p.add_argument("-V", "--version", action="version", version=f"llmpipe {__version__}")
    p.add_argument("--json", action="store_true", help="with -l: print JSON")
    p.add_argument("--range", metavar="START:END", type=_byte_range, help="decompress only these bytes of the original")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep TARGET.part if interrupted, and continue an interrupted run from it (input files only)",
    )
    p.add_argument(
        "--keep-going", action="store_true", help="decompress past damaged blocks, leaving them out (exit 1)"
    )
    progress = p.add_mutually_exclusive_group()
    progress.add_argument("--progress", dest="progress", action="store_true", default=None, help="show progress")
    progress.add_argument("--no-progress", dest="progress", action="store_false", help="never show progress")
    p.add_argument("--model", metavar="NAME", help="default, a Hugging Face id, a model directory or a .gguf file")
    p.add_argument(
        "--chunk-size",
        type=_size,
        default=DEFAULT_CHUNK_SIZE,
        metavar="BYTES",
        help="bytes per chunk (default %(default)s; accepts K/M)",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        metavar="N",
        help=f"chunks coded together; also rows decoded together (default {DEFAULT_BATCH}, "
        "or fewer when the memory plan says so)",
    )
    p.add_argument(
        "-M",
        "--memory",
        type=_size,
        metavar="SIZE",
        help="memory the run may use, e.g. 16G (default: what the device has available); "
        "checked against the memory plan before any weights are read",
    )
    p.add_argument(
        "--context",
        type=int,
        default=DEFAULT_CONTEXT,
        metavar="TOKENS",
        help="longest context a prediction sees; past it the window restarts from its last --overlap tokens "
        "(default %(default)s: the whole chunk)",
    )
    p.add_argument(
        "--overlap",
        type=int,
        default=DEFAULT_OVERLAP,
        metavar="TOKENS",
        help="tokens kept when the context window restarts (default %(default)s)",
    )
    p.add_argument(
        "-T",
        "--threads",
        type=int,
        default=ALL_THREADS,
        metavar="N",
        help="compute threads; 0 (the default): one per CPU this process may use (recorded in float archives; "
        "exact ones do not depend on it)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        metavar="DEV",
        help="where the model runs: cpu or cuda[:N]; exact archives decode the same on either (default %(default)s)",
    )
    p.add_argument(
        "--numerics",
        choices=("exact", "float"),
        default="exact",
        help="exact: integer arithmetic, decodes on any machine (default); "
        "float: float32/16 (see --dtype), decodes only where the machine and settings match",
    )
    p.add_argument(
        "--dtype",
        choices=FLOAT_DTYPES,
        default="float32",
        help="with --numerics float: the weights' and activations' dtype (default %(default)s)",
    )
    p.add_argument(
        "--load-in-8bit",
        action="store_true",
        help="with --numerics float: int8 weights through bitsandbytes (LLM.int8), half of float16's memory",
    )
    p.add_argument(
        "--steer",
        default=DEFAULT_STEER,
        metavar="MODE",
        help="a prompt before every chunk, stored in the header: none, text:STRING, random:N[:SEED], learn:N (N "
        "virtual tokens trained on the input's first window, coded the way that gives the smallest total), auto "
        "(default: on inputs of 32 MiB or more, learn one token on the first window and keep it only when its "
        "projected saving clearly exceeds its cost; on smaller ones, none; see STEERING.md)",
    )
    p.add_argument(
        "--steer-epochs",
        type=int,
        default=DEFAULT_STEER_EPOCHS,
        metavar="N",
        help="training steps of a learned prompt (%(default)s)",
    )
    p.add_argument(
        "--steer-seconds",
        type=float,
        default=DEFAULT_STEER_SECONDS,
        metavar="S",
        help="time limit of a learned prompt's training (%(default)g)",
    )
    p.add_argument(
        "--mixer",
        choices=("ngram-match", "none"),
        default="ngram-match",
        help="mix the model with n-gram and match models of each chunk's own history (default %(default)s)",
    )
    return p


def _size(text: str) -> int:
    """Bytes: ``4096``, ``8K``, ``16M``, ``16GB``, ``1.5GiB`` (binary units)."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    number = text.lower().removesuffix("ib").removesuffix("b")
    try:
        if number[-1:] in units:
            return int(float(number[:-1]) * units[number[-1]])
        return int(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None


def _byte_range(text: str) -> tuple[int, int | None]:
    """``START:END`` (END exclusive; either may be empty, sizes accept K/M)."""
    start, sep, end = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"not a range (START:END): {text!r}")
    lo = _size(start) if start else 0
    hi = _size(end) if end else None
    if lo < 0 or hi is not None and hi < lo:
        raise argparse.ArgumentTypeError(f"empty or reversed range: {text!r}")
    return lo, hi


def _fetch(argv: list[str]) -> int:
    """``llmpipe fetch [MODEL]``: fill the cache now, for a machine that will later be offline."""
    from llmpipe.models import cache

    parser = argparse.ArgumentParser(prog="llmpipe fetch", description="put a model into llmpipe's cache")
    parser.add_argument("model", nargs="?", default=None, help="default, a Hugging Face id, a directory or a .gguf")
    args = parser.parse_args(argv)
    if args.model in (None, "default", cache.DEFAULT_MODEL):
        cache.fetch_default(log=lambda m: print(m, file=sys.stderr))
    model = cache.load(args.model)
    print(f"{model.directory} (weights sha256 {model.weights_sha256[:16]}..., loads in {model.load_seconds:.2f} s)")
    return 0


def _models(argv: list[str]) -> int:
    """``llmpipe models``: list the cache, remove a model, or plan a model's memory without loading it."""
    from llmpipe.codec import ContextWindow
    from llmpipe.compressor import coding_plan, default_batch
    from llmpipe.engine.plan import parameter_count
    from llmpipe.models import cache

    parser = argparse.ArgumentParser(prog="llmpipe models", description="the model cache and memory plans")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--plan", metavar="MODEL", help="print the memory MODEL needs (no weights are loaded)")
    action.add_argument("--remove", metavar="NAME", help="delete a cached model")
    parser.add_argument("--numerics", choices=("exact", "float"), default="exact")
    parser.add_argument("--dtype", choices=FLOAT_DTYPES, default="float32")
    parser.add_argument("--load-in-8bit", action="store_true", help="float numerics with int8 weights")
    parser.add_argument(
        "-b", "--batch", type=int, metavar="ROWS", help=f"rows (default {DEFAULT_BATCH}, or fewer to fit -M)"
    )
    parser.add_argument("--context", type=int, default=DEFAULT_CONTEXT, metavar="TOKENS")
    parser.add_argument("--chunk-size", type=_size, default=DEFAULT_CHUNK_SIZE, metavar="BYTES")
    parser.add_argument("--mixer", choices=("ngram-match", "none"), default="ngram-match")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default %(default)s)")
    parser.add_argument("-M", "--memory", type=_size, metavar="SIZE", help="limit to check against, e.g. 16G")
    args = parser.parse_args(argv)
    if args.remove:
        print(f"removed {cache.remove(args.remove)}")
        return 0
    if args.plan:
        if args.numerics == "exact" and (args.dtype != "float32" or args.load_in_8bit):
            raise UsageError("--dtype and --load-in-8bit plan the float engine (add --numerics float)")
        config = cache.find_config(args.plan)
        try:  # the overlap does not change the memory; any valid one will do
            context = ContextWindow(args.context, max(1, min(DEFAULT_OVERLAP, args.context - 2)) if args.context else 0)
        except ValueError as exc:
            raise UsageError(f"--context {args.context}: {exc}") from None
        plan_of = functools.partial(
            coding_plan,
            config,
            numerics=args.numerics,
            dtype=args.dtype,
            load_in_8bit=args.load_in_8bit,
            device=args.device,
            chunk_size=args.chunk_size,
            context=context,
            mixing=args.mixer != "none",
            limit=args.memory,
        )
        if args.batch is None:  # what compressing would choose
            args.batch = default_batch(plan_of(batch=DEFAULT_BATCH), args.chunk_size)
        plan = plan_of(batch=args.batch)
        weights = f" ({args.dtype}{', 8-bit' if args.load_in_8bit else ''})" if args.numerics == "float" else ""
        positions = min(context.longest_context(args.chunk_size), config.max_position_embeddings)
        print(
            f"{args.plan}: {config.arch}, {parameter_count(config) / 1e6:.0f}M parameters; {args.numerics} numerics"
            f"{weights}, batch {args.batch} x {positions} positions, on {args.device}"
        )
        print("\n".join(plan.render()))
        return 0 if plan.fits() else 1
    models = cache.cached_models()
    if not models:
        print(f"no models in {cache.cache_dir() / 'models'} (`llmpipe fetch` puts the default one there)")
    for model in models:
        size = f"{model.disk_bytes / 2**20:.0f} MiB"
        print(f"{model.name:<36} {model.arch:<9} {size:>9}  sha256 {model.weights_sha256[:16]}  {model.directory}")
    return 0


class _PartFile:
    """``TARGET.part``, renamed to ``TARGET`` only by :meth:`commit`; kept on failure when resuming."""

    def __init__(self, target: Path, force: bool, resume: bool) -> None:
        if target.exists() and not force:
            raise UsageError(f"{target}: already exists (use -f to overwrite)")
        self.target = target
        self.part = target.with_name(target.name + PART_SUFFIX)
        self.resume = resume
        self.resumed = self.part.exists() and resume
        if self.part.exists() and not (resume or force):
            raise UsageError(f"{self.part}: exists (an interrupted run?); use --resume to continue it or -f to redo it")
        self.file: BinaryIO = open(self.part, "r+b" if self.resumed else "w+b")  # noqa: SIM115 - closed by commit/discard

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.part, self.target)
        with contextlib.suppress(OSError):  # make the rename itself durable
            directory = os.open(self.target.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        if self.resume and self.part.exists():
            print(f"llmpipe: {self.part}: kept; run the same command again to resume", file=sys.stderr)
        else:
            self.part.unlink(missing_ok=True)


class _Progress:
    """One self-overwriting line on stderr: bytes in and out, bits per byte, speed, ETA."""

    def __init__(self, name: str, total: int | None, enabled: bool, compressing: bool) -> None:
        self.name, self.total, self.enabled, self.compressing = name, total, enabled, compressing
        self.started = time.perf_counter()
        self.shown = False

    def __call__(self, stats) -> None:
        if not self.enabled:
            return
        done = stats.input_bytes if self.compressing else stats.output_bytes  # bytes of the file being read
        seconds = time.perf_counter() - self.started
        speed = stats.input_bytes / 1024 / seconds if seconds else 0.0
        line = (
            f"{self.name}: {stats.input_bytes >> 10} KiB <-> {stats.output_bytes >> 10} KiB, "
            f"{stats.bits_per_byte:.3f} bits/byte, {speed:.2f} KB/s"
        )
        if self.total and done and done < self.total:
            eta = seconds * (self.total - done) / done
            hours, rest = divmod(int(eta), 3600)
            line += f", {100 * done / self.total:.0f}%, ETA {hours}:{rest // 60:02d}:{rest % 60:02d}"
        print(f"\r{line}\x1b[K", end="", file=sys.stderr, flush=True)
        self.shown = True

    def done(self) -> None:
        if self.shown:
            print(file=sys.stderr)


class _Job:
    """One input file (or stdin) to one output, with the options of the command line."""

    def __init__(self, args: argparse.Namespace, source: str) -> None:
        self.args = args
        self.source = source
        self.name = "<stdin>" if source == "-" else source
        if source != "-" and not Path(source).is_file():
            raise LlmpipeError(f"{source}: no such file")
        self.compressing = not (args.decompress or args.test)
        self.target = None if args.test else _target_for(source, args)
        if args.rm and (self.target is None or source == "-"):
            raise UsageError("--rm needs an input file and an output file")
        if args.resume and (self.target is None or source == "-"):
            raise UsageError("--resume needs an input file and an output file")
        if self.target is None and self.compressing and sys.stdout.isatty() and not args.force:
            raise UsageError("refusing to write compressed data to a terminal (use -f to force)")
        if source == "-" and not self.compressing and sys.stdin.isatty() and not args.force:
            raise UsageError("refusing to read compressed data from a terminal (use -f to force)")

    def run(self, work: Callable[[BinaryIO, BinaryIO, _PartFile | None, _Progress], object]) -> None:
        args = self.args
        with contextlib.ExitStack() as stack:
            src = sys.stdin.buffer if self.source == "-" else stack.enter_context(open(self.source, "rb"))
            total = os.fstat(src.fileno()).st_size if self.source != "-" else None
            show = args.progress if args.progress is not None else sys.stderr.isatty() and not args.quiet
            progress = _Progress(self.name, total, bool(show), self.compressing)
            stack.callback(progress.done)
            if self.target is None:
                sink = _NullSink() if args.test else sys.stdout.buffer
                work(src, sink, None, progress)
                sink.flush()
                return
            out = _PartFile(Path(self.target), args.force, args.resume)
            try:
                work(src, out.file, out, progress)
            except DamagedArchiveError:
                out.commit()  # --keep-going: everything that verified is written, the rest reported
                raise
            except BaseException:
                out.discard()
                raise
            out.commit()
        if args.rm:
            if self.compressing:
                _check_archive_file(self.target)
            os.unlink(self.source)


class _NullSink:
    """Where ``-t`` writes."""

    def write(self, data: bytes) -> int:
        return len(data)

    def flush(self) -> None:
        pass


def _check_archive_file(path: str) -> None:
    """Re-read a written archive's structure (every header, CRC and the index) before the source goes."""
    from llmpipe.format.container import MAX_WINDOW, ContainerReader

    with open(path, "rb") as archive:
        reader = ContainerReader(archive, path)
        first = True
        while reader.read_stream_header(first) is not None:
            first = False
            while reader.read_block(MAX_WINDOW, 4096) is not None:
                pass


def _target_for(source: str, args: argparse.Namespace) -> str | None:
    if args.stdout or source == "-":
        return args.output
    if args.output:
        return args.output
    if args.decompress:
        if not source.endswith(SUFFIX):
            raise UsageError(f"{source}: unknown suffix (expected {SUFFIX}); use -c or -o")
        return source[: -len(SUFFIX)]
    return source + SUFFIX


def _list(files: list[str], args: argparse.Namespace) -> int:
    from llmpipe.listing import describe, format_table

    infos = []
    for path in files:
        if path == "-":
            raise UsageError("-l needs archive files (it reads the index at the end)")
        if not Path(path).is_file():
            raise LlmpipeError(f"{path}: no such file")
        with open(path, "rb") as source:
            try:
                infos.append(describe(source, path, blocks=args.verbose))
            except LlmpipeError as exc:
                raise type(exc)(f"{path}: {exc}") from None
    if args.json:
        print(json.dumps(infos if len(infos) > 1 else infos[0], indent=1))
    else:
        print(format_table(infos, args.verbose))
    return 0


def _compress_work(args: argparse.Namespace):
    from llmpipe.compressor import Compressor

    compressor = Compressor(
        args.model,
        chunk_size=args.chunk_size,
        batch=args.batch,
        threads=args.threads,
        numerics=args.numerics,
        context=args.context,
        overlap=args.overlap,
        mixing=args.mixer != "none",
        device=args.device,
        dtype=args.dtype,
        load_in_8bit=args.load_in_8bit,
        memory=args.memory,
        steer=args.steer,
        steer_epochs=args.steer_epochs,
        steer_seconds=args.steer_seconds,
        log=(lambda line: print(f"llmpipe: {line}", file=sys.stderr)) if args.verbose else None,
    )

    def work(src: BinaryIO, dst: BinaryIO, out: _PartFile | None, progress: _Progress) -> object:
        resume = compressor.resume(dst, str(out.part), src) if out and out.resumed else None
        return compressor.compress_stream(src, dst, progress, resume)

    return work


def _decompress_work(args: argparse.Namespace):
    from llmpipe.decompressor import Decompressor

    batch = args.batch or DEFAULT_BATCH
    worker = Decompressor(args.model, force=args.force, threads=args.threads, batch=batch, device=args.device)

    def work(src: BinaryIO, dst: BinaryIO, out: _PartFile | None, progress: _Progress) -> object:
        name = getattr(src, "name", "<stdin>")
        name = name if isinstance(name, str) else "<stdin>"
        seekable = src.seekable()
        if out and out.resumed or args.range or args.keep_going and seekable and _has_index(src, name):
            if not seekable:
                raise UsageError("--range and --resume need an archive file, not a pipe")
            start, end = args.range or (0, None)
            if out and out.resumed:
                start = max(start, worker.verified_prefix(src, name, dst))
                dst.seek(start)
                dst.truncate()
            return worker.decompress_range(src, dst, name, start, end, keep_going=args.keep_going, progress=progress)
        return worker.decompress_stream(src, dst, name, keep_going=args.keep_going, progress=progress)

    return work


def _has_index(source: BinaryIO, name: str) -> bool:
    """Whether a seekable archive's index reads cleanly (else ``--keep-going`` reads front to back)."""
    from llmpipe.format.container import read_archive_index

    try:
        read_archive_index(source, name)
        return True
    except LlmpipeError:
        return False
    finally:
        source.seek(0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # runs cleanup like Ctrl-C does
    try:
        if argv[:1] == ["fetch"]:
            return _fetch(argv[1:])
        if argv[:1] == ["models"]:
            return _models(argv[1:])
        args = _parser().parse_args(argv)
        files = args.files or ["-"]
        if args.list:
            return _list(files, args)
        if args.output and len(files) > 1:
            raise UsageError("-o takes one input file")
        if (args.range or args.keep_going) and not args.decompress:
            raise UsageError("--range and --keep-going go with -d")
        if args.range and args.resume:
            raise UsageError("--range and --resume do not go together")
        work = None  # built at the first usable file: it loads the model once for all of them
        status = 0
        for source in files:  # like zstd: an error in one file is reported and the others still run
            try:
                job = _Job(args, source)
                if work is None:
                    work = _compress_work(args) if job.compressing else _decompress_work(args)
                job.run(lambda s, d, o, p, job=job, work=work: _report(args, job.name, work(s, d, o, p)))
            except LlmpipeError as exc:
                print(f"llmpipe: {exc}", file=sys.stderr)
                status = max(status, exc.exit_code)
        return status
    except LlmpipeError as exc:
        print(f"llmpipe: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        _silence_stdout()
        return 1
    except KeyboardInterrupt:
        print("llmpipe: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        print(f"llmpipe: {exc.filename or 'output'}: {exc.strerror or exc}", file=sys.stderr)
        return 1


def _report(args: argparse.Namespace, name: str, stats) -> object:
    if args.verbose:
        kb_s = stats.input_bytes / 1024 / stats.seconds if stats.seconds else 0.0
        print(
            f"{name}: {stats.input_bytes} <-> {stats.output_bytes} bytes, {stats.bits_per_byte:.3f} bits/byte, "
            f"{kb_s:.2f} KB/s, blocks {stats.blocks}",
            file=sys.stderr,
        )
    return stats


def _silence_stdout() -> None:
    """After a broken pipe, stop Python from complaining while flushing stdout at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass
