"""Streaming decompression: read blocks, decode, verify, and only then write.

Nothing reaches the sink before its block's CRC32 matched. LLM blocks come
in groups: a group starts at a block flagged ``GROUP_START``, which says how
many LLM blocks (rows) it has, so at most about ``2 x batch`` blocks are held
per group. Float archives are decoded exactly in the encoder's groups; exact
archives in batches of whole groups up to the decoder's own ``batch`` rows
(their numbers do not depend on the batch), which keeps the model busy even
for archives made with small batches. The model is loaded
at the first LLM block, and its identity and numerics are checked against the
header before any model work.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard

from llmpipe import mixer
from llmpipe.codec import ContextWindow, LlmCoder
from llmpipe.compressor import Stats
from llmpipe.defaults import ALL_THREADS, DEFAULT_BATCH, FLOAT_DTYPES, resolve_threads
from llmpipe.engine import create_engine, usable_device
from llmpipe.engine.exact_transformer import NUMERICS_VERSION
from llmpipe.engine.float_engine import numeric_fingerprint
from llmpipe.errors import (
    ArchiveError,
    ChecksumError,
    DamagedArchiveError,
    ModelError,
    ModelMismatchError,
)
from llmpipe.format.container import (
    FLAG_GROUP_START,
    MAX_CHUNK_SIZE,
    MAX_ROWS,
    MAX_WINDOW,
    Block,
    BlockEntry,
    BlockKind,
    ContainerReader,
    GroupTracker,
    crc32,
    read_archive_index,
)
from llmpipe.models import cache
from llmpipe.models.cache import LoadedModel
from llmpipe.steering.prompt import prompt_from_record


@dataclass
class _Pending:
    number: int  # 1-based block number within its stream
    offset: int  # original byte offset of the block (within the whole archive)
    block: Block
    clip: tuple[int, int] | None  # original bytes of the block to write (absolute offsets); None: decode only


def _header_field(header: dict, path: str, kind: type):
    value: object = header
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            raise ArchiveError(f"corrupt header: missing {path}")
        value = value[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise ArchiveError(f"corrupt header: bad {path}")
    return value


def _find_cached_model(weights_sha256: str) -> Path | None:
    """A prepared model in the cache with these weights, whatever it is called."""
    models = cache.cache_dir() / "models"
    for meta_file in sorted(models.glob("*/llmpipe.json")) if models.is_dir() else []:
        try:
            if json.loads(meta_file.read_text()).get("weights_sha256") == weights_sha256:
                return meta_file.parent
        except (OSError, ValueError):
            continue
    return None


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
        self._model_spec = model
        self._device = device
        self._force = force
        self._threads = resolve_threads(threads)
        self._batch = batch  # rows decoded together for exact archives (float ones keep the encoder's groups)
        self._model: LoadedModel | None = model if isinstance(model, LoadedModel) else None
        self._coder: LlmCoder | None = None
        self._coder_key: tuple | None = None
        self._prompt_record: dict | None = None  # the steering record the engine holds now

    def _coder_for(self, header: dict) -> LlmCoder:
        """Load the model (once) and check it and the numerics against the header."""
        wanted = header["model"]
        if self._model is None:
            spec = self._model_spec
            if spec is None:
                found = _find_cached_model(str(wanted.get("weights_sha256")))
                spec = str(found) if found else str(wanted.get("name"))
            try:
                self._model = cache.load(spec)  # type: ignore[arg-type]
            except ModelError as exc:
                raise ModelError(f"this archive needs model {wanted.get('name')!r}: {exc}") from None
        have = self._model.identity()
        for key in ("weights_sha256", "tokenizer_sha256"):
            if have[key] != wanted.get(key):
                raise ModelMismatchError(
                    f"archive was made with model {wanted.get('name')!r} ({key} {str(wanted.get(key))[:12]}...), "
                    f"but model {have['name']!r} ({have[key][:12]}...) is loaded"
                )
        numerics = _header_field(header, "numerics", dict)
        kind = numerics.get("engine")
        if kind == "exact":
            if numerics.get("version") != NUMERICS_VERSION:
                raise ArchiveError(
                    f"archive uses exact numerics version {numerics.get('version')!r}; "
                    f"this llmpipe implements version {NUMERICS_VERSION} (a newer llmpipe may decode it)"
                )
            threads, batch = self._threads, 0  # exact results depend on neither
            dtype, load_in_8bit = "float32", False
        elif kind == "float":
            threads = _header_field(header, "numerics.threads", int)
            batch = _header_field(header, "numerics.batch", int)
            if not (1 <= threads <= 256 and 1 <= batch <= MAX_ROWS):
                raise ArchiveError("corrupt header: threads or batch out of range")
            dtype = _header_field(header, "numerics.dtype", str)
            load_in_8bit = numerics.get("load_in_8bit", False) is True
            if dtype not in FLOAT_DTYPES:
                raise ArchiveError(f"unsupported float dtype {dtype!r}")
            mine = numeric_fingerprint(threads, batch, dtype, load_in_8bit, usable_device(self._device))
            differ = sorted(k for k in set(mine) | set(numerics) if mine.get(k) != numerics.get(k))
            if differ and not self._force:
                detail = ", ".join(f"{k} {numerics.get(k)!r} here {mine.get(k)!r}" for k in differ)
                raise ModelMismatchError(
                    f"archive was made with float numerics that differ from this machine ({detail}); "
                    "it may not decode here (use -f to try anyway)"
                )
        else:
            raise ArchiveError(f"unsupported numerics engine {kind!r}")
        key = (have["weights_sha256"], kind, threads, dtype, load_in_8bit)
        if self._coder is None or self._coder_key != key:
            engine = create_engine(kind, self._model, threads, batch, self._device, dtype, load_in_8bit)
            self._coder = LlmCoder(engine, self._model.tokenizer)
            self._coder_key = key
            self._prompt_record = None
        if header.get("steering") != self._prompt_record:  # each stream of a concatenation has its own
            config = self._model.config
            prompt = prompt_from_record(header.get("steering"), config.hidden_size, config.vocab_size)
            self._coder.engine.set_prompt(prompt)
            self._prompt_record = header.get("steering")
        return self._coder

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
            stats.damaged.append(f"everything after the {stats.input_bytes} bytes written ({exc})")
        stats.seconds = time.perf_counter() - started
        _raise_if_damaged(stats)
        return stats

    def iter_decompressed(
        self, source: BinaryIO, name: str = "<stdin>", stats: Stats | None = None, *, keep_going: bool = False
    ) -> Iterator[bytes]:
        """The verified contents of ``source``, block by block, reading it front to back once."""
        stats = stats if stats is not None else Stats()
        reader = ContainerReader(source, name)
        first = True
        base = 0  # original offset where the current stream starts
        while (header := reader.read_stream_header(first)) is not None:
            first = False
            limits = _StreamSettings.of(header, self._batch)
            tracker = GroupTracker(limits.batch)
            pending: list[_Pending] = []  # blocks held until their group is complete (and merged)
            while True:
                try:
                    block = reader.read_block(limits.max_size, limits.batch)
                    if block is not None:
                        tracker.add(block, reader.blocks)
                except ArchiveError:
                    if limits.merge_rows:  # exact blocks decode alone: keep every complete one
                        yield from self._decode(pending, limits, stats, keep_going)
                    raise
                finally:
                    stats.output_bytes = reader.offset
                if block is None:
                    yield from self._decode(pending, limits, stats, keep_going)
                    break
                offset = base + reader.total - block.original_size
                pending.append(_Pending(reader.blocks, offset, block, (offset, offset + block.original_size)))
                if not tracker.open and limits.flush_now(pending):
                    yield from self._decode(pending, limits, stats, keep_going)
                    pending = []
            base += reader.total

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
        for stream in streams:
            limits = _StreamSettings.of(stream.header, self._batch)
            needed = _blocks_to_read(stream.blocks, start, end, float_groups=not limits.merge_rows)
            pending: list[_Pending] = []
            for entry, wanted in needed:
                if pending and limits.flush_before(entry, pending):
                    self._write(self._decode(pending, limits, stats, keep_going), sink, stats, progress)
                    pending = []
                try:
                    block = _read_indexed_block(source, name, entry, limits)
                except ArchiveError as exc:
                    where = _where(entry.number, entry.original_offset, entry.original_size)
                    if not keep_going:
                        raise ArchiveError(f"{where}: {exc}") from None
                    stats.damaged.append(where)
                    continue
                stats.output_bytes += entry.stored_size
                clip = (max(start, entry.original_offset), min(end, entry.original_offset + entry.original_size))
                pending.append(_Pending(entry.number, entry.original_offset, block, clip if wanted else None))
            self._write(self._decode(pending, limits, stats, keep_going), sink, stats, progress)
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
            limits = _StreamSettings.of(stream.header, self._batch)
            for entry in stream.blocks:
                if entry.original_offset + entry.original_size > have:
                    return prefix
                block = _read_indexed_block(source, name, entry, limits)
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

    def _decode(
        self, pending: list[_Pending], stream: _StreamSettings, stats: Stats, keep_going: bool
    ) -> Iterator[bytes]:
        """Decode held blocks (LLM ones as one batch) and yield each wanted block's verified bytes in order."""
        llm = [p for p in pending if p.block.kind == BlockKind.LLM]
        decoded: dict[int, bytes] = {}
        if llm:
            coder = self._coder_for(stream.header)
            prime = _header_field(stream.header, "prime_token", int)
            if prime != coder.tokenizer.prime_token:
                raise ModelMismatchError("archive uses a different prime token than this tokenizer")
            payloads, counts = [p.block.payload for p in llm], [p.block.token_count for p in llm]
            symbol_lists = coder.decode_group(payloads, counts, stream.context, stream.mixer_version)
            for item, symbols in zip(llm, symbol_lists, strict=True):
                try:
                    decoded[item.number] = coder.tokenizer.decode(symbols)
                except ValueError:
                    decoded[item.number] = b""  # reported as a checksum mismatch below
        for item in pending:
            if item.clip is None:
                continue  # decoded only because its float group had to be
            block = item.block
            if block.kind == BlockKind.LLM:
                data = decoded[item.number]
            elif block.kind == BlockKind.ZSTD:
                data = _unzstd(block)
            else:
                data = block.payload
            if len(data) != block.original_size or crc32(data) != block.checksum:
                where = _where(item.number, item.offset, block.original_size)
                if not keep_going:
                    raise ChecksumError(f"{where}: checksum mismatch")
                stats.damaged.append(where)
                continue
            stats.input_bytes += block.original_size
            stats.blocks[block.kind.name.lower()] += 1
            lo, hi = item.clip
            yield data[lo - item.offset : hi - item.offset]

    def decompress(self, data: bytes) -> bytes:
        """Decompress a bytes object in memory."""
        sink = io.BytesIO()
        self.decompress_stream(io.BytesIO(data), sink)
        return sink.getvalue()


@dataclass
class _StreamSettings:
    """A stream's header and what it allows, checked before any block is read."""

    header: dict
    max_size: int  # largest block
    batch: int  # largest group
    merge_rows: int  # rows decoded together for exact numerics; 0 for float (decode the coded groups)
    context: ContextWindow
    mixer_version: int  # mixer.VERSIONS, 0: none

    @classmethod
    def of(cls, header: dict, decoder_batch: int) -> _StreamSettings:
        chunk_size = _header_field(header, "chunk_size", int)
        if not 0 < chunk_size <= MAX_CHUNK_SIZE:
            raise ArchiveError(f"corrupt header: chunk size {chunk_size}")
        _header_field(header, "model", dict)
        batch = _header_field(header, "batch", int)
        if not 1 <= batch <= MAX_ROWS:
            raise ArchiveError(f"corrupt header: batch {batch} out of range")
        exact = _header_field(header, "numerics.engine", str) == "exact"
        window = _header_field(header, "context.window", int)
        overlap = _header_field(header, "context.overlap", int)
        try:
            context = ContextWindow(window, overlap)
        except ValueError as exc:
            raise ArchiveError(f"corrupt header: {exc}") from None
        mixer_version = mixer.check_record(header.get("mixer"))
        rows = decoder_batch if exact else 0
        return cls(header, min(batch * chunk_size, MAX_WINDOW), batch, rows, context, mixer_version)

    def flush_now(self, pending: list[_Pending]) -> bool:
        """Front to back, after a group closed: flush a full batch, plain blocks at once, and never hold
        more than a batch's worth of blocks."""
        rows = sum(p.block.kind == BlockKind.LLM for p in pending)
        return rows == 0 or rows >= self.merge_rows or len(pending) >= 2 * self.merge_rows + 1

    def flush_before(self, entry: BlockEntry, pending: list[_Pending]) -> bool:
        """Through the index: float groups end where the next one starts; exact rows merge up to a batch."""
        if entry.kind != BlockKind.LLM:
            return False
        if not self.merge_rows:
            return bool(entry.flags & FLAG_GROUP_START)
        return sum(p.block.kind == BlockKind.LLM for p in pending) >= self.merge_rows


def _read_indexed_block(source: BinaryIO, name: str, entry: BlockEntry, limits: _StreamSettings) -> Block:
    """The block the index entry points at, its header checked, and of the size the index says."""
    source.seek(entry.offset)
    reader = ContainerReader(source, name, entry.offset)
    block = reader.read_block(limits.max_size, limits.batch)
    if block is None or reader.offset - entry.offset != entry.stored_size:
        raise ArchiveError("the index does not point at a block of its size")
    return block


def _blocks_to_read(
    blocks: list[BlockEntry], start: int, end: int, float_groups: bool
) -> list[tuple[BlockEntry, bool]]:
    """The blocks overlapping ``start:end`` as ``(entry, wanted)``; float groups of wanted blocks come whole."""

    def overlaps(b: BlockEntry) -> bool:
        return b.original_offset < end and b.original_offset + b.original_size > start

    groups: list[int] = []  # the group number of each block (LLM blocks only)
    group = -1
    for b in blocks:
        if b.kind == BlockKind.LLM and b.flags & FLAG_GROUP_START:
            group += 1
        groups.append(group if b.kind == BlockKind.LLM else -1)
    pairs = list(zip(blocks, groups, strict=True))
    needed_groups = {g for b, g in pairs if g >= 0 and overlaps(b)} if float_groups else set()
    return [(b, overlaps(b)) for b, g in pairs if overlaps(b) or g in needed_groups]


def _where(number: int, offset: int, size: int) -> str:
    return f"block {number} (bytes {offset}-{offset + size - 1})"


def _raise_if_damaged(stats: Stats) -> None:
    if stats.damaged:
        shown = ", ".join(stats.damaged[:5]) + (", ..." if len(stats.damaged) > 5 else "")
        raise DamagedArchiveError(f"{len(stats.damaged)} damaged part(s) left out: {shown}")


def _unzstd(block: Block) -> bytes:
    try:
        return zstandard.ZstdDecompressor().decompress(block.payload, max_output_size=block.original_size)
    except zstandard.ZstdError:
        return b""  # reported as a checksum mismatch by the caller
