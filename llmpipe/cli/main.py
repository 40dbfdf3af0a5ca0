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
import json
import os
import signal
import sys
from pathlib import Path
from typing import BinaryIO

from llmpipe.cli import commands
from llmpipe.cli.files import Job, PartFile, Progress
from llmpipe.cli.parser import parser
from llmpipe.defaults import DEFAULT_BATCH
from llmpipe.errors import LlmpipeError, UsageError


def _list(files: list[str], args: argparse.Namespace) -> int:
    from llmpipe.cli.listing import describe, format_table

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


def _compress_work(args: argparse.Namespace, pools: list):
    from llmpipe.pipeline.compress import Compressor

    options = {
        "model": args.model,
        "chunk_size": args.chunk_size,
        "batch": args.batch,
        "threads": args.threads,
        "numerics": args.numerics,
        "context": args.context,
        "overlap": args.overlap,
        "mixing": args.mixer != "none",
        "device": args.device,
        "dtype": args.dtype,
        "load_in_8bit": args.load_in_8bit,
        "memory": args.memory,
        "steer": args.steer,
        "steer_epochs": args.steer_epochs,
        "steer_seconds": args.steer_seconds,
        "log": (lambda line: print(f"llmpipe: {line}", file=sys.stderr)) if args.verbose else None,
    }
    if args.workers or args.ray:
        from llmpipe.scale.launch import compressor_on_workers

        compressor, pool = compressor_on_workers(options, args.workers, args.ray)
        pools.append(pool)
    else:
        compressor = Compressor(options.pop("model"), **options)

    def work(src: BinaryIO, dst: BinaryIO, out: PartFile | None, progress: Progress) -> object:
        resume = compressor.resume(dst, str(out.part), src) if out and out.resumed else None
        return compressor.compress_stream(src, dst, progress, resume)

    return work


def _decompress_work(args: argparse.Namespace, pools: list):
    from llmpipe.pipeline.decompress import Decompressor

    options = {
        "force": args.force,
        "threads": args.threads,
        "batch": args.batch or DEFAULT_BATCH,
        "device": args.device,
    }
    if args.workers or args.ray:
        from llmpipe.scale.launch import decompressor_on_workers

        worker, pool = decompressor_on_workers({"model": args.model, **options}, args.workers, args.ray)
        pools.append(pool)
    else:
        worker = Decompressor(args.model, **options)

    def work(src: BinaryIO, dst: BinaryIO, out: PartFile | None, progress: Progress) -> object:
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
    from llmpipe.format.index import read_archive_index

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
            return commands.fetch(argv[1:])
        if argv[:1] == ["models"]:
            return commands.models(argv[1:])
        args = parser().parse_args(argv)
        files = args.files or ["-"]
        if args.list:
            return _list(files, args)
        if args.output and len(files) > 1:
            raise UsageError("-o takes one input file")
        if (args.range or args.keep_going) and not args.decompress:
            raise UsageError("--range and --keep-going go with -d")
        if args.range and args.resume:
            raise UsageError("--range and --resume do not go together")
        if args.workers is not None and args.workers < 1:
            raise UsageError("--workers must be at least 1")
        work = None  # built at the first usable file: it loads the model once for all of them
        pools: list = []  # worker pools it started, stopped at the end
        status = 0
        try:
            for source in files:  # like zstd: an error in one file is reported and the others still run
                try:
                    job = Job(args, source)
                    if work is None:
                        work = _compress_work(args, pools) if job.compressing else _decompress_work(args, pools)
                    job.run(lambda s, d, o, p, job=job, work=work: _report(args, job.name, work(s, d, o, p)))
                except LlmpipeError as exc:
                    print(f"llmpipe: {exc}", file=sys.stderr)
                    status = max(status, exc.exit_code)
        finally:
            for pool in pools:
                pool.close()
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
        kb_s = stats.original_bytes / 1024 / stats.seconds if stats.seconds else 0.0
        print(
            f"{name}: {stats.original_bytes} <-> {stats.archive_bytes} bytes, {stats.bits_per_byte:.3f} bits/byte, "
            f"{kb_s:.2f} KB/s, {stats.blocks} blocks of rows {stats.rows}",
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
