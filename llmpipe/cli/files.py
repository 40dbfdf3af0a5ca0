"""One input to one output: target names, part files renamed only when complete, progress, ``--rm``.

An output file is written as ``TARGET.part`` and renamed only after the
whole stream was written (compression) or verified (decompression). On an
error or Ctrl-C the part file is removed, unless ``--resume`` was given:
then it stays, and the same command with ``--resume`` continues from it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from llmpipe.errors import DamagedArchiveError, LlmpipeError, UsageError

SUFFIX = ".llmp"
PART_SUFFIX = ".part"


class PartFile:
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


class Progress:
    """One self-overwriting line on stderr: bytes in and out, bits per byte, speed, ETA."""

    def __init__(self, name: str, total: int | None, enabled: bool, compressing: bool) -> None:
        self.name, self.total, self.enabled, self.compressing = name, total, enabled, compressing
        self.started = time.perf_counter()
        self.shown = False

    def __call__(self, stats) -> None:
        if not self.enabled:
            return
        done = stats.original_bytes if self.compressing else stats.archive_bytes  # bytes of the file being read
        seconds = time.perf_counter() - self.started
        speed = stats.original_bytes / 1024 / seconds if seconds else 0.0
        line = (
            f"{self.name}: {stats.original_bytes >> 10} KiB <-> {stats.archive_bytes >> 10} KiB, "
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


class Job:
    """One input file (or stdin) to one output, with the options of the command line."""

    def __init__(self, args: argparse.Namespace, source: str) -> None:
        self.args = args
        self.source = source
        self.name = "<stdin>" if source == "-" else source
        if source != "-" and not Path(source).is_file():
            raise LlmpipeError(f"{source}: no such file")
        self.compressing = not (args.decompress or args.test)
        self.target = None if args.test else target_for(source, args)
        if args.rm and (self.target is None or source == "-"):
            raise UsageError("--rm needs an input file and an output file")
        if args.resume and (self.target is None or source == "-"):
            raise UsageError("--resume needs an input file and an output file")
        if self.target is None and self.compressing and sys.stdout.isatty() and not args.force:
            raise UsageError("refusing to write compressed data to a terminal (use -f to force)")
        if source == "-" and not self.compressing and sys.stdin.isatty() and not args.force:
            raise UsageError("refusing to read compressed data from a terminal (use -f to force)")

    def run(self, work: Callable[[BinaryIO, BinaryIO, PartFile | None, Progress], object]) -> None:
        args = self.args
        with contextlib.ExitStack() as stack:
            src = sys.stdin.buffer if self.source == "-" else stack.enter_context(open(self.source, "rb"))
            total = os.fstat(src.fileno()).st_size if self.source != "-" else None
            show = args.progress if args.progress is not None else sys.stderr.isatty() and not args.quiet
            progress = Progress(self.name, total, bool(show), self.compressing)
            stack.callback(progress.done)
            if self.target is None:
                sink = _NullSink() if args.test else sys.stdout.buffer
                work(src, sink, None, progress)
                sink.flush()
                return
            out = PartFile(Path(self.target), args.force, args.resume)
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
    from llmpipe.format.container import ContainerReader
    from llmpipe.format.fields import MAX_ROWS, MAX_WINDOW

    with open(path, "rb") as archive:
        reader = ContainerReader(archive, path)
        first = True
        while reader.read_stream_header(first) is not None:
            first = False
            while reader.read_block(MAX_WINDOW, MAX_ROWS) is not None:
                pass


def target_for(source: str, args: argparse.Namespace) -> str | None:
    if args.stdout or source == "-":
        return args.output
    if args.output:
        return args.output
    if args.decompress:
        if not source.endswith(SUFFIX):
            raise UsageError(f"{source}: unknown suffix (expected {SUFFIX}); use -c or -o")
        return source[: -len(SUFFIX)]
    return source + SUFFIX
