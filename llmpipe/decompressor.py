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
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard

from llmpipe.codec import LlmCoder
from llmpipe.compressor import DEFAULT_BATCH, DEFAULT_THREADS, Stats
from llmpipe.engine import create_engine
from llmpipe.engine.exact_llama import NUMERICS_VERSION
from llmpipe.engine.float_engine import numeric_fingerprint
from llmpipe.errors import ArchiveError, ChecksumError, ModelError, ModelMismatchError
from llmpipe.format.container import (
    FLAG_GROUP_START,
    MAX_CHUNK_SIZE,
    MAX_ROWS,
    MAX_WINDOW,
    Block,
    BlockKind,
    ContainerReader,
    crc32,
)
from llmpipe.models import cache
from llmpipe.models.cache import LoadedModel


@dataclass
class _Pending:
    number: int  # 1-based block number within its stream
    offset: int  # original byte offset of the block
    block: Block


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
        threads: int = DEFAULT_THREADS,
        batch: int = DEFAULT_BATCH,
    ) -> None:
        self._model_spec = model
        self._force = force
        self._threads = threads
        self._batch = batch  # rows decoded together for exact archives (float ones keep the encoder's groups)
        self._model: LoadedModel | None = model if isinstance(model, LoadedModel) else None
        self._coder: LlmCoder | None = None
        self._coder_key: tuple | None = None

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
        elif kind == "float":
            threads = _header_field(header, "numerics.threads", int)
            batch = _header_field(header, "numerics.batch", int)
            if not (1 <= threads <= 256 and 1 <= batch <= MAX_ROWS):
                raise ArchiveError("corrupt header: threads or batch out of range")
            mine = numeric_fingerprint(threads, batch)
            differ = sorted(k for k in set(mine) | set(numerics) if mine.get(k) != numerics.get(k))
            if differ and not self._force:
                detail = ", ".join(f"{k} {numerics.get(k)!r} here {mine.get(k)!r}" for k in differ)
                raise ModelMismatchError(
                    f"archive was made with float numerics that differ from this machine ({detail}); "
                    "it may not decode here (use -f to try anyway)"
                )
        else:
            raise ArchiveError(f"unsupported numerics engine {kind!r}")
        key = (have["weights_sha256"], kind, threads)
        if self._coder is None or self._coder_key != key:
            self._coder = LlmCoder(create_engine(kind, self._model, threads, batch), self._model.tokenizer)
            self._coder_key = key
        return self._coder

    def decompress_stream(self, source: BinaryIO, sink: BinaryIO, name: str = "<stdin>") -> Stats:
        """Decode every stream in ``source`` (concatenated archives) into ``sink``."""
        stats = Stats()
        started = time.perf_counter()
        reader = ContainerReader(source, name)
        first = True
        while (header := reader.read_stream_header(first)) is not None:
            first = False
            self._decode_one_stream(reader, header, sink, stats)
        stats.output_bytes = reader.offset
        stats.seconds = time.perf_counter() - started
        return stats

    def _decode_one_stream(self, reader: ContainerReader, header: dict, sink: BinaryIO, stats: Stats) -> None:
        chunk_size = _header_field(header, "chunk_size", int)
        if not 0 < chunk_size <= MAX_CHUNK_SIZE:
            raise ArchiveError(f"corrupt header: chunk size {chunk_size}")
        _header_field(header, "model", dict)
        batch = _header_field(header, "batch", int)
        if not 1 <= batch <= MAX_ROWS:
            raise ArchiveError(f"corrupt header: batch {batch} out of range")
        max_size = min(batch * chunk_size, MAX_WINDOW)
        # float groups must be decoded exactly as they were coded; exact ones are merged up to our own batch
        merge_rows = self._batch if _header_field(header, "numerics.engine", str) == "exact" else 0
        pending: list[_Pending] = []  # blocks held until their group is complete (and merged)
        rows_missing = 0  # LLM blocks the open group still needs
        group_blocks = 0  # blocks since the open group started
        number = 0
        offset = 0
        while True:
            record = reader.read_block(max_size, batch)
            if not isinstance(record, Block):
                if rows_missing:
                    raise ArchiveError(f"corrupt archive: stream ends inside a group ({rows_missing} blocks missing)")
                self._flush(pending, header, sink, stats)
                count, total = record
                if count != number or total != offset:
                    raise ArchiveError(
                        f"corrupt end record: says {count} blocks / {total} bytes, found {number} / {offset}"
                    )
                return
            number += 1
            if record.kind == BlockKind.LLM:
                if record.flags & FLAG_GROUP_START:
                    if rows_missing:
                        raise ArchiveError(f"corrupt archive: block {number} starts a group inside another")
                    rows_missing = record.group_rows
                    group_blocks = 0
                elif not rows_missing:
                    raise ArchiveError(f"corrupt archive: block {number} continues a group that never started")
                rows_missing -= 1
            pending.append(_Pending(number, offset, record))
            offset += record.original_size
            group_blocks += 1
            if rows_missing and group_blocks > 2 * batch + 1:  # rows interleave with at most one plain block each
                raise ArchiveError(f"corrupt archive: group at block {number - group_blocks + 1} never completes")
            if not rows_missing:
                rows = sum(p.block.kind == BlockKind.LLM for p in pending)
                # flush a full batch, plain blocks at once, and never hold more than a batch's worth of blocks
                if rows == 0 or rows >= merge_rows or len(pending) >= 2 * merge_rows + 1:
                    self._flush(pending, header, sink, stats)
                    pending = []

    def _flush(self, pending: list[_Pending], header: dict, sink: BinaryIO, stats: Stats) -> None:
        llm = [p for p in pending if p.block.kind == BlockKind.LLM]
        decoded: dict[int, bytes] = {}
        if llm:
            coder = self._coder_for(header)
            prime = _header_field(header, "prime_token", int)
            if prime != coder.tokenizer.prime_token:
                raise ModelMismatchError("archive uses a different prime token than this tokenizer")
            symbol_lists = coder.decode_group([p.block.payload for p in llm], [p.block.token_count for p in llm])
            for item, symbols in zip(llm, symbol_lists, strict=True):
                try:
                    decoded[item.number] = coder.tokenizer.decode(symbols)
                except ValueError:
                    decoded[item.number] = b""  # reported as a checksum mismatch below
        for item in pending:
            block = item.block
            if block.kind == BlockKind.LLM:
                data = decoded[item.number]
            elif block.kind == BlockKind.ZSTD:
                data = _unzstd(block)
            else:
                data = block.payload
            if len(data) != block.original_size or crc32(data) != block.checksum:
                end = item.offset + block.original_size - 1
                raise ChecksumError(f"block {item.number} (bytes {item.offset}-{end}): checksum mismatch")
            sink.write(data)
            stats.input_bytes += len(data)
            stats.blocks[block.kind.name.lower()] += 1

    def decompress(self, data: bytes) -> bytes:
        """Decompress a bytes object in memory."""
        sink = io.BytesIO()
        self.decompress_stream(io.BytesIO(data), sink)
        return sink.getvalue()


def _unzstd(block: Block) -> bytes:
    try:
        return zstandard.ZstdDecompressor().decompress(block.payload, max_output_size=block.original_size)
    except zstandard.ZstdError:
        return b""  # reported as a checksum mismatch by the caller
