"""Streaming decompression: read blocks, decode, verify, and only then write.

Nothing reaches the sink before its block's CRC32 matched. A block's LLM
rows are a lockstep group (in version 2 archives a group ran over several
one-row blocks, so at most about ``2 x batch`` blocks are held per group).
Float archives are decoded exactly in the encoder's groups; exact
archives in batches of whole groups up to the decoder's own ``batch`` rows
(their numbers do not depend on the batch), which keeps the model busy even
for archives made with small batches. The model is loaded
at the first LLM block, and its identity and numerics are checked against the
header before any model work. Each group's LLM rows are a job (``jobs``):
decoded here, or by a pool of workers (``llmpipe.scale``) while the next
groups are read; the driver assembles and verifies every block in order.
"""

from __future__ import annotations

import io
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import BinaryIO

import zstandard

from llmpipe.defaults import ALL_THREADS, DEFAULT_BATCH, resolve_threads
from llmpipe.errors import ArchiveError, ChecksumError, DamagedArchiveError, ModelMismatchError, UsageError
from llmpipe.format.block import ZSTD_FORMAT, GroupTracker, Row, RowKind
from llmpipe.format.container import ContainerReader
from llmpipe.format.fields import crc32
from llmpipe.format.index import read_archive_index
from llmpipe.models.cache import LoadedModel
from llmpipe.pipeline.archive_coders import ArchiveCoders
from llmpipe.pipeline.jobs import DecodeRows, Dispatch, Inline
from llmpipe.pipeline.stats import Stats
from llmpipe.pipeline.stream_settings import (
    Pending,
    StreamSettings,
    blocks_to_read,
    header_field,
    read_indexed_block,
)


class Decompressor:
    """Decodes llmpipe archives; keeps the loaded model between streams."""

    def __init__(
        self,
        model: str | LoadedModel | None = None,
        *,
        force: bool = False,
        threads: int = ALL_THREADS,
        batch: int = DEFAULT_BATCH,
        device: str = "cpu",
    ) -> None:
        self._coders = ArchiveCoders(model, resolve_threads(threads), device, force)
        self._batch = batch  # rows decoded together for exact archives (float ones keep the encoder's groups)
        self.dispatch: Dispatch = Inline(self)
        """Where groups' LLM rows are decoded: here, or by a pool of workers that the caller sets."""

    def decompress_stream(
        self,
        source: BinaryIO,
        sink: BinaryIO,
        name: str = "<stdin>",
        *,
        keep_going: bool = False,
        progress: Callable[[Stats], None] | None = None,
    ) -> Stats:
        """Decode every stream in ``source`` (concatenated archives) front to back into ``sink``.

        With ``keep_going`` a block that fails its checksum is left out and
        decoding goes on; damage that loses the thread (a block header, the
        index) ends decoding there, keeping what was written; a
        :class:`DamagedArchiveError` at the end lists it all.
        """
        stats = Stats()
        started = time.perf_counter()
        try:
            for data in self.iter_decompressed(source, name, stats, keep_going=keep_going):
                sink.write(data)
                stats.seconds = time.perf_counter() - started
                if progress:
                    progress(stats)
        except ArchiveError as exc:
            if not keep_going:
                raise
            stats.damaged.append(f"everything after the {stats.original_bytes} bytes written ({exc})")
        stats.seconds = time.perf_counter() - started
        _raise_if_damaged(stats)
        return stats

    def iter_decompressed(
        self, source: BinaryIO, name: str = "<stdin>", stats: Stats | None = None, *, keep_going: bool = False
    ) -> Iterator[bytes]:
        """The verified contents of ``source``, block by block, reading it front to back once."""
        stats = stats if stats is not None else Stats()
        reader = ContainerReader(source, name)
        in_flight: deque[_Group] = deque()
        first = True
        base = 0  # original offset where the current stream starts
        while True:
            try:
                header = reader.read_stream_header(first)
            except ArchiveError:
                yield from self._finish(in_flight, 0, stats, keep_going)  # what was read whole is written
                raise
            if header is None:
                break
            first = False
            limits = StreamSettings.of(header, self._batch, reader.version)
            tracker = GroupTracker(limits.batch)
            pending: list[Pending] = []  # blocks held until their group is complete (and merged)
            while True:
                try:
                    block = reader.read_block(limits.max_size, limits.batch)
                    if block is not None:
                        tracker.add(block, reader.blocks)
                except ArchiveError:
                    if limits.merge_rows:  # exact blocks decode alone: keep every complete one
                        in_flight.append(self._start(pending, limits))
                    yield from self._finish(in_flight, 0, stats, keep_going)
                    raise
                finally:
                    stats.archive_bytes = reader.offset
                if block is None:
                    in_flight.append(self._start(pending, limits))
                    break
                offset = base + reader.total - block.original_size
                pending.append(Pending(reader.blocks, offset, block, (offset, offset + block.original_size)))
                if not tracker.open and limits.flush_now(pending):
                    in_flight.append(self._start(pending, limits))
                    pending = []
                    yield from self._finish(in_flight, self.dispatch.ahead, stats, keep_going)
            base += reader.total
        yield from self._finish(in_flight, 0, stats, keep_going)

    def decompress_range(
        self,
        source: BinaryIO,
        sink: BinaryIO,
        name: str,
        start: int = 0,
        end: int | None = None,
        *,
        keep_going: bool = False,
        progress: Callable[[Stats], None] | None = None,
    ) -> Stats:
        """Decode bytes ``start:end`` of a seekable archive's content, reading only the blocks that cover them.

        The index locates the blocks; float groups are decoded whole (their
        numbers depend on the batch) but only the wanted bytes are written.
        With ``keep_going`` a damaged block (header or contents) is left out.
        """
        stats = Stats()
        started = time.perf_counter()
        streams = read_archive_index(source, name)
        end = sum(s.original_size for s in streams) if end is None else end
        in_flight: deque[_Group] = deque()
        for stream in streams:
            limits = StreamSettings.of(stream.header, self._batch, stream.version)
            needed = blocks_to_read(stream.blocks, start, end, float_groups=not limits.merge_rows)
            pending: list[Pending] = []
            for entry, wanted in needed:
                if pending and limits.flush_before(entry, pending):
                    in_flight.append(self._start(pending, limits))
                    pending = []
                    self._write(self._finish(in_flight, self.dispatch.ahead, stats, keep_going), sink, stats, progress)
                try:
                    block = read_indexed_block(source, name, entry, limits)
                except ArchiveError as exc:
                    where = _where(entry.number, entry.original_offset, entry.original_size)
                    if not keep_going:
                        self._write(self._finish(in_flight, 0, stats, keep_going), sink, stats, progress)
                        raise ArchiveError(f"{where}: {exc}") from None
                    stats.damaged.append(where)
                    continue
                stats.archive_bytes += entry.stored_size
                clip = (max(start, entry.original_offset), min(end, entry.original_offset + entry.original_size))
                pending.append(Pending(entry.number, entry.original_offset, block, clip if wanted else None))
            in_flight.append(self._start(pending, limits))
        self._write(self._finish(in_flight, 0, stats, keep_going), sink, stats, progress)
        stats.seconds = time.perf_counter() - started
        _raise_if_damaged(stats)
        return stats

    def verified_prefix(self, source: BinaryIO, name: str, existing: BinaryIO) -> int:
        """How many leading bytes of ``existing`` (an interrupted output) match whole blocks of the archive.

        Reads the index and each covered block's header, and compares the
        block checksums with the bytes already there; no model work.
        """
        have = existing.seek(0, io.SEEK_END)
        prefix = 0
        for stream in read_archive_index(source, name):
            limits = StreamSettings.of(stream.header, self._batch, stream.version)
            for entry in stream.blocks:
                if entry.original_offset + entry.original_size > have:
                    return prefix
                block = read_indexed_block(source, name, entry, limits)
                existing.seek(entry.original_offset)
                if crc32(existing.read(entry.original_size)) != block.checksum:
                    return prefix
                prefix = entry.original_offset + entry.original_size
        return prefix

    def _write(
        self, pieces: Iterator[bytes], sink: BinaryIO, stats: Stats, progress: Callable[[Stats], None] | None
    ) -> None:
        for data in pieces:
            sink.write(data)
        if progress:
            progress(stats)

    def _start(self, pending: list[Pending], stream: StreamSettings) -> _Group:
        """Hand out the LLM rows of held blocks (one batch) to be decoded."""
        llm = [row for p in pending for row in p.block.llm_rows]
        if not llm:
            return _Group(pending, stream, None, None)
        if self.dispatch.remote and not stream.merge_rows:
            raise UsageError("an archive with float numerics decodes in one process, not on workers")
        job = DecodeRows(
            stream.header, stream.version, tuple(row.payload for row in llm), tuple(row.token_count for row in llm)
        )
        return _Group(pending, stream, job, self.dispatch.submit(job))

    def run(self, job: DecodeRows) -> list[bytes]:
        """Decode a group's LLM rows handed out by a driver (``jobs``): each row's bytes (empty where the
        symbols spell nothing, which the block's CRC32 then refuses)."""
        stream = StreamSettings.of(job.header, self._batch, job.version)
        coder = self._coders.coder_for(job.header)
        prime = header_field(job.header, "prime_token", int)
        if prime != coder.tokenizer.prime_token:
            raise ModelMismatchError("archive uses a different prime token than this tokenizer")
        symbol_lists = coder.decode_group(list(job.payloads), list(job.counts), stream.context, stream.mixer_version)
        decoded = []
        for symbols in symbol_lists:
            try:
                decoded.append(coder.tokenizer.decode(symbols))
            except ValueError:
                decoded.append(b"")
        return decoded

    def _finish(self, in_flight: deque[_Group], keep: int, stats: Stats, keep_going: bool) -> Iterator[bytes]:
        """Yield the verified wanted bytes of the groups in flight, in order, until ``keep`` are left."""
        while len(in_flight) > keep:
            group = in_flight.popleft()
            blocks = self._assemble(group, group.decoded.result() if group.decoded else [])
            if group.job and self.dispatch.remote and not all(ok for _, ok in blocks):
                blocks = self._assemble(group, self.dispatch.submit(group.job).result())  # a worker's fault?
            for item, (data, ok) in zip(group.pending, blocks, strict=True):
                if item.clip is None:
                    continue  # decoded only because its float group had to be
                if not ok:
                    where = _where(item.number, item.offset, item.block.original_size)
                    if not keep_going:
                        raise ChecksumError(f"{where}: checksum mismatch")
                    stats.damaged.append(where)
                    continue
                stats.original_bytes += item.block.original_size
                stats.count(item.block.rows)
                lo, hi = item.clip
                yield data[lo - item.offset : hi - item.offset]

    def _assemble(self, group: _Group, decoded: list[bytes]) -> list[tuple[bytes, bool]]:
        """Each held block's bytes from its decoded LLM rows and its plain rows, and whether its size and
        CRC32 match."""
        rows = iter(decoded)
        assembled = []
        for item in group.pending:
            block = item.block
            data = b"".join(
                next(rows, b"") if row.kind == RowKind.LLM else _plain(row, block.original_size, group.stream.version)
                for row in block.rows
            )
            assembled.append((data, len(data) == block.original_size and crc32(data) == block.checksum))
        return assembled

    def decompress(self, data: bytes) -> bytes:
        """Decompress a bytes object in memory."""
        sink = io.BytesIO()
        self.decompress_stream(io.BytesIO(data), sink)
        return sink.getvalue()


@dataclass
class _Group:
    """Held blocks whose LLM rows were handed out as ``job`` (None: no LLM rows), to be finished in order."""

    pending: list[Pending]
    stream: StreamSettings
    job: DecodeRows | None
    decoded: Future | None


def _where(number: int, offset: int, size: int) -> str:
    return f"block {number} (bytes {offset}-{offset + size - 1})"


def _raise_if_damaged(stats: Stats) -> None:
    if stats.damaged:
        shown = ", ".join(stats.damaged[:5]) + (", ..." if len(stats.damaged) > 5 else "")
        raise DamagedArchiveError(f"{len(stats.damaged)} damaged part(s) left out: {shown}")


def _plain(row: Row, limit: int, version: int) -> bytes:
    """A raw row's bytes, or a zstd row's frame decompressed to at most ``limit`` bytes (its block's size)."""
    if row.kind == RowKind.RAW:
        return row.payload
    try:
        unpacker = zstandard.ZstdDecompressor(format=ZSTD_FORMAT[version])
        return unpacker.decompress(row.payload, max_output_size=limit)
    except zstandard.ZstdError:
        return b""  # reported as a checksum mismatch by the caller
