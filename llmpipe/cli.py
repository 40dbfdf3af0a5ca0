"""The ``llmpipe`` command: a Unix filter with zstd/xz conventions.

Exit codes: 0 success, 1 error (one line on stderr, no traceback). With no
file argument it filters stdin to stdout; ``FILE`` compresses to
``FILE.llmp``; ``-d FILE.llmp`` restores ``FILE``. Output files are written
next to their target under a temporary name and renamed only after the whole
stream was written (compression) or verified (decompression), so an error or
Ctrl-C never leaves a partial file behind.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from llmpipe import __version__
from llmpipe.engine import NUMERICS
from llmpipe.errors import LlmpipeError, UsageError

SUFFIX = ".llmp"


def _parser() -> argparse.ArgumentParser:
    from llmpipe.compressor import DEFAULT_BATCH, DEFAULT_CHUNK_SIZE, DEFAULT_THREADS

    p = argparse.ArgumentParser(
        prog="llmpipe",
        description="Lossless compression with a language model driving a range coder.",
        epilog="Commands: `llmpipe fetch` puts the default model into the cache.",
    )
    p.add_argument("files", nargs="*", metavar="FILE", help="files to process (none or '-': stdin to stdout)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("-z", "--compress", action="store_true", help="compress (the default)")
    mode.add_argument("-d", "--decompress", action="store_true", help="decompress")
    p.add_argument("-c", "--stdout", action="store_true", help="write to standard output")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE (one input only)")
    p.add_argument("-k", "--keep", action="store_true", help="keep input files (the default)")
    p.add_argument(
        "-f", "--force", action="store_true", help="overwrite outputs; allow terminals; accept numeric mismatches"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print no warnings")
    p.add_argument("-v", "--verbose", action="store_true", help="print statistics to stderr")
    p.add_argument("-V", "--version", action="version", version=f"llmpipe {__version__}")
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
        default=DEFAULT_BATCH,
        metavar="N",
        help="chunks coded together; also rows decoded together (default %(default)s)",
    )
    p.add_argument(
        "-T",
        "--threads",
        type=int,
        default=DEFAULT_THREADS,
        metavar="N",
        help="compute threads (recorded in float archives; exact ones do not depend on it) (default %(default)s)",
    )
    p.add_argument(
        "--numerics",
        choices=NUMERICS,
        default="exact",
        help="exact: integer arithmetic, decodes on any machine (default); "
        "float: float32, decodes only where the machine and settings match",
    )
    return p


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20}
    try:
        if text[-1:].lower() in units:
            return int(text[:-1]) * units[text[-1].lower()]
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None


def _fetch() -> int:
    from llmpipe.models import cache

    path = cache.fetch_default(log=lambda m: print(m, file=sys.stderr))
    model = cache.load(None)
    print(f"{path} (weights sha256 {model.weights_sha256[:16]}..., loads in {model.load_seconds:.2f} s)")
    return 0


class _AtomicOutput:
    """A file written under a temporary name, renamed into place only by :meth:`commit`."""

    def __init__(self, target: Path, force: bool) -> None:
        if target.exists() and not force:
            raise UsageError(f"{target}: already exists (use -f to overwrite)")
        self.target = target
        fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent or ".")
        self.temp = Path(temp)
        self.file: BinaryIO = os.fdopen(fd, "wb")

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.temp, self.target)

    def discard(self) -> None:
        self.file.close()
        self.temp.unlink(missing_ok=True)


def _run_one(
    process: Callable[[BinaryIO, BinaryIO, str], object], source: str, target: str | None, args: argparse.Namespace
) -> None:
    """Run ``process(src, dst, name)`` from ``source`` ('-' is stdin) to ``target`` (None is stdout)."""
    name = "<stdin>" if source == "-" else source
    if source != "-" and not Path(source).is_file():
        raise LlmpipeError(f"{source}: no such file")
    compressing = not args.decompress
    if target is None and compressing and sys.stdout.isatty() and not args.force:
        raise UsageError("refusing to write compressed data to a terminal (use -f to force)")
    if source == "-" and not compressing and sys.stdin.isatty() and not args.force:
        raise UsageError("refusing to read compressed data from a terminal (use -f to force)")
    with contextlib.ExitStack() as stack:
        src = sys.stdin.buffer if source == "-" else stack.enter_context(open(source, "rb"))
        if target is None:
            process(src, sys.stdout.buffer, name)
            sys.stdout.buffer.flush()
            return
        out = _AtomicOutput(Path(target), args.force)
        try:
            process(src, out.file, name)
            out.commit()
        except BaseException:
            out.discard()
            raise


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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # runs cleanup like Ctrl-C does
    try:
        if argv[:1] == ["fetch"]:
            return _fetch()
        args = _parser().parse_args(argv)
        files = args.files or ["-"]
        if args.output and len(files) > 1:
            raise UsageError("-o takes one input file")
        if args.decompress:
            from llmpipe.decompressor import Decompressor

            worker = Decompressor(args.model, force=args.force, threads=args.threads, batch=args.batch)

            def process(src: BinaryIO, dst: BinaryIO, name: str) -> object:
                return _report(args, name, worker.decompress_stream(src, dst, name))
        else:
            from llmpipe.compressor import Compressor

            compressor = Compressor(
                args.model,
                chunk_size=args.chunk_size,
                batch=args.batch,
                threads=args.threads,
                numerics=args.numerics,
            )

            def process(src: BinaryIO, dst: BinaryIO, name: str) -> object:
                return _report(args, name, compressor.compress_stream(src, dst))

        for source in files:
            _run_one(process, source, _target_for(source, args), args)
        return 0
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
