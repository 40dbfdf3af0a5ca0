"""What a stream's header allows a decoder, checked before any block is read or any model work.

Also the blocks a decoder holds until their group is complete, and which
blocks ``--range`` must read through the index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO

from llmpipe.codec import mixer
from llmpipe.codec.context import ContextWindow
from llmpipe.errors import ArchiveError
from llmpipe.format.block import Block, RowKind
from llmpipe.format.container import ContainerReader
from llmpipe.format.fields import MAX_CHUNK_SIZE, MAX_ROWS, MAX_WINDOW
from llmpipe.format.index import BlockEntry


@dataclass
class Pending:
    """A block read and held until its group can be decoded."""

    number: int  # 1-based block number within its stream
    offset: int  # original byte offset of the block (within the whole archive)
    block: Block
    clip: tuple[int, int] | None  # original bytes of the block to write (absolute offsets); None: decode only


def header_field(header: dict, path: str, kind: type):
    """The header's value at a dotted ``path``, of type ``kind`` (else :class:`ArchiveError`)."""
    value: object = header
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            raise ArchiveError(f"corrupt header: missing {path}")
        value = value[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise ArchiveError(f"corrupt header: bad {path}")
    return value


@dataclass
class StreamSettings:
    """A stream's header and what it allows, checked before any block is read."""

    header: dict
    max_size: int  # largest block
    batch: int  # largest group
    merge_rows: int  # rows decoded together for exact numerics; 0 for float (decode the coded groups)
    context: ContextWindow
    mixer_version: int  # mixer.VERSIONS, 0: none
    version: int  # the stream's format version

    @classmethod
    def of(cls, header: dict, decoder_batch: int, version: int) -> StreamSettings:
        if version == 3 and header.get("model") is None:  # no model: zstd and raw rows only
            return cls(header, MAX_WINDOW, MAX_ROWS, decoder_batch, ContextWindow(0, 0), 0, version)
        chunk_size = header_field(header, "chunk_size", int)
        if not 0 < chunk_size <= MAX_CHUNK_SIZE:
            raise ArchiveError(f"corrupt header: chunk size {chunk_size}")
        header_field(header, "model", dict)
        batch = header_field(header, "batch", int)
        if not 1 <= batch <= MAX_ROWS:
            raise ArchiveError(f"corrupt header: batch {batch} out of range")
        exact = header_field(header, "numerics.engine", str) == "exact"
        window = header_field(header, "context.window", int)
        overlap = header_field(header, "context.overlap", int)
        try:
            context = ContextWindow(window, overlap)
        except ValueError as exc:
            raise ArchiveError(f"corrupt header: {exc}") from None
        mixer_version = mixer.check_record(header.get("mixer"))
        rows = decoder_batch if exact else 0
        return cls(header, min(batch * chunk_size, MAX_WINDOW), batch, rows, context, mixer_version, version)

    def flush_now(self, pending: list[Pending]) -> bool:
        """Front to back, after a group closed: flush a full batch, plain blocks at once, and never hold
        more than a batch's worth of blocks."""
        rows = _llm_rows(pending)
        return rows == 0 or rows >= self.merge_rows or len(pending) >= 2 * self.merge_rows + 1

    def flush_before(self, entry: BlockEntry, pending: list[Pending]) -> bool:
        """Through the index: float groups end where the next one starts; exact rows merge up to a batch."""
        if entry.kind not in (None, RowKind.LLM):
            return False
        if not self.merge_rows:
            return entry.group_start
        return _llm_rows(pending) >= self.merge_rows


def _llm_rows(pending: list[Pending]) -> int:
    return sum(len(p.block.llm_rows) for p in pending)


def read_indexed_block(source: BinaryIO, name: str, entry: BlockEntry, limits: StreamSettings) -> Block:
    """The block the index entry points at, its header checked, and of the size the index says."""
    source.seek(entry.offset)
    reader = ContainerReader(source, name, entry.offset, limits.version, limits.header.get("model") is not None)
    block = reader.read_block(limits.max_size, limits.batch)
    if block is None or (reader.offset - entry.offset, block.original_size) != (entry.stored_size, entry.original_size):
        raise ArchiveError("the index does not point at a block of its sizes")
    return block


def blocks_to_read(blocks: list[BlockEntry], start: int, end: int, float_groups: bool) -> list[tuple[BlockEntry, bool]]:
    """The blocks overlapping ``start:end`` as ``(entry, wanted)``; float groups of wanted blocks come whole."""

    def overlaps(b: BlockEntry) -> bool:
        return b.original_offset < end and b.original_offset + b.original_size > start

    groups: list[int] = []  # the group number of each block that may hold LLM rows
    group = -1
    for b in blocks:
        may_code = b.kind in (None, RowKind.LLM)  # a version 3 block is its own group
        group += may_code and b.group_start
        groups.append(group if may_code else -1)
    pairs = list(zip(blocks, groups, strict=True))
    needed_groups = {g for b, g in pairs if g >= 0 and overlaps(b)} if float_groups else set()
    return [(b, overlaps(b)) for b, g in pairs if overlaps(b) or g in needed_groups]
