"""Blocks and their rows, as the pipeline sees them, and version 3's block bytes.

A version 3 block is one window of the input: up to ``batch`` rows, each
LLM-coded, zstd or raw, with one CRC32 over the window's original bytes and
one over the block header (FORMAT.md section 3). The rows of a block are its
lockstep group. A version 2 block held one row (or one run of plain rows),
with a CRC of its own, and groups ran across blocks; the reader turns it into
a one-row :class:`Block` with ``group_rows`` saying where a group starts.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum

import zstandard

from llmpipe.errors import ArchiveError
from llmpipe.format.fields import crc32, encode_varint, zigzag

BLOCK_MARKER = 1  # version 3: the byte that starts a block (0 starts the index)
ZSTD_FORMAT = {2: zstandard.FORMAT_ZSTD1, 3: zstandard.FORMAT_ZSTD1_MAGICLESS}
"""A zstd row's frame, by format version: version 3 leaves out the 4-byte magic number."""


class RowKind(IntEnum):
    """How a row's bytes are stored (also a version 2 block's kind; 0 began the index there)."""

    RAW = 1
    ZSTD = 2
    LLM = 3


@dataclass
class Row:
    kind: RowKind
    payload: bytes
    token_count: int = 0  # LLM rows: symbols coded
    original_size: int = 0  # raw rows, and every version 2 row; 0 where the reader learns it by decoding


@dataclass
class Block:
    rows: list[Row]
    original_size: int
    checksum: int  # CRC32 of the block's original bytes
    group_rows: int = 0
    """LLM rows of the lockstep group this block starts: in version 3 its own LLM rows; in version 2 the
    ``r`` of a ``GROUP_START`` block (0 on the group's other blocks)."""

    @property
    def llm_rows(self) -> list[Row]:
        return [row for row in self.rows if row.kind == RowKind.LLM]

    def header_bytes(self) -> bytes:
        """Version 3: ``marker | n | r | row entries | [t0] | content CRC | header CRC``."""
        symbols = [row.token_count for row in self.llm_rows]
        base = symbols[0] if symbols else 0
        head = bytearray([BLOCK_MARKER]) + encode_varint(self.original_size) + encode_varint(len(self.rows))
        for row in self.rows:
            if row.kind == RowKind.LLM:
                head += encode_varint(zigzag(row.token_count - base) << 2 | RowKind.LLM)
                head += encode_varint(len(row.payload))
            else:
                head += encode_varint(len(row.payload) << 2 | row.kind)
        if symbols:
            head += encode_varint(base)
        head += struct.pack("<I", self.checksum)
        return bytes(head + struct.pack("<I", crc32(bytes(head))))

    def to_bytes(self) -> bytes:
        return self.header_bytes() + b"".join(row.payload for row in self.rows)

    def index_entry(self, stored_size: int) -> bytes:
        """Version 3: ``stored size | original size``."""
        return encode_varint(stored_size) + encode_varint(self.original_size)


@dataclass
class GroupTracker:
    """Checks the lockstep-group rules as blocks go by: a version 3 block is a whole group; a version 2
    group starts at a ``GROUP_START`` block and spans its next ``r - 1`` LLM blocks (FORMAT.md, version 2)."""

    batch: int
    rows_missing: int = 0  # LLM rows the open group still needs
    blocks_in_group: int = field(default=0)

    @property
    def open(self) -> bool:
        return self.rows_missing > 0

    def add(self, block: Block, number: int) -> None:
        llm = len(block.llm_rows)
        if llm:
            if block.group_rows:
                if self.rows_missing:
                    raise ArchiveError(f"corrupt archive: block {number} starts a group inside another")
                self.rows_missing = block.group_rows
                self.blocks_in_group = 0
            elif not self.rows_missing:
                raise ArchiveError(f"corrupt archive: block {number} continues a group that never started")
            self.rows_missing -= llm
        self.blocks_in_group += 1
        if self.rows_missing and self.blocks_in_group > 2 * self.batch + 1:
            start = number - self.blocks_in_group + 1
            raise ArchiveError(f"corrupt archive: group at block {start} never completes")
