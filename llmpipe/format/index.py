"""The index of a seekable archive, read from the end: where every block is, in the file and the original.

``-l``, ``--range``, ``--resume`` of decompression and ``--keep-going``
find blocks through it without reading the archive front to back
(FORMAT.md, "Index" and "Footer").
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import BinaryIO

from llmpipe.errors import ArchiveError
from llmpipe.format.container import (
    FOOTER_MAGIC,
    FOOTER_SIZE,
    MAX_INDEX_BYTES,
    STREAM_HEADER_FIXED,
    BlockKind,
    ContainerReader,
    crc32,
    decode_varint,
)


@dataclass
class BlockEntry:
    """A block as the index describes it, located in the file and in the original."""

    number: int  # 1-based within its stream
    kind: BlockKind
    flags: int
    offset: int  # file offset of the block header
    stored_size: int  # block header and payload
    original_offset: int  # within the whole archive's content (all streams)
    original_size: int
    token_count: int


@dataclass
class StreamIndex:
    """One stream of a seekable archive, read from its footer and index only."""

    start: int  # file offset of the stream's magic
    header_size: int
    blocks: list[BlockEntry]
    original_size: int
    index_size: int  # index record and footer
    header: dict = field(default_factory=dict)

    @property
    def stored_size(self) -> int:
        return self.header_size + sum(b.stored_size for b in self.blocks) + self.index_size


def read_archive_index(source: BinaryIO, name: str) -> list[StreamIndex]:
    """The index of every stream of a seekable archive, walking back from the end; headers are read too.

    Raises :class:`ArchiveError` when the end of the file is not a valid
    footer (a truncated archive, trailing garbage) or the pieces disagree.
    """
    end = source.seek(0, os.SEEK_END)
    if end == 0:
        raise ArchiveError("empty input: not an llmpipe archive")
    streams: list[StreamIndex] = []
    while end > 0:
        if end < STREAM_HEADER_FIXED + 2 + FOOTER_SIZE:
            raise ArchiveError("no index: the archive is truncated or has trailing data")
        source.seek(end - FOOTER_SIZE)
        footer = source.read(FOOTER_SIZE)
        if footer[12:] != FOOTER_MAGIC or struct.unpack("<I", footer[:4])[0] != crc32(footer[4:12]):
            raise ArchiveError("no index: the archive is truncated or has trailing data (footer not found)")
        (index_size,) = struct.unpack("<Q", footer[4:12])
        index_start = end - FOOTER_SIZE - index_size
        if not 6 <= index_size <= MAX_INDEX_BYTES or index_start < 0:
            raise ArchiveError("corrupt footer: index size out of range")
        source.seek(index_start)
        index = source.read(index_size)
        if crc32(index[:-4]) != struct.unpack("<I", index[-4:])[0] or index[:2] != bytes([BlockKind.INDEX, 0]):
            raise ArchiveError("corrupt index: CRC mismatch")
        stream = _parse_index(index[:-4], index_start, index_size + FOOTER_SIZE)
        if stream.start < 0:
            raise ArchiveError("corrupt index: more data than the file holds")
        streams.append(stream)
        end = stream.start
    streams.reverse()
    base = 0
    for stream in streams:
        reader = ContainerReader(source, name, stream.start)
        source.seek(stream.start)
        header = reader.read_stream_header(first=True)
        if reader.header_size != stream.header_size:
            raise ArchiveError("corrupt index: header size disagrees with the header")
        stream.header = header or {}
        for block in stream.blocks:
            block.original_offset += base
        base += stream.original_size
    return streams


def _parse_index(index: bytes, index_start: int, index_size: int) -> StreamIndex:
    header_size, pos = decode_varint(index, 2, "index")
    count, pos = decode_varint(index, pos, "index")
    total, pos = decode_varint(index, pos, "index")
    if count > len(index):  # every entry takes at least four bytes
        raise ArchiveError("corrupt index: block count out of range")
    blocks = []
    offset = original = 0
    for number in range(1, count + 1):
        if pos + 2 > len(index):
            raise ArchiveError("corrupt index: ends inside an entry")
        kind, flags = index[pos], index[pos + 1]
        if kind not in (BlockKind.RAW, BlockKind.ZSTD, BlockKind.LLM):
            raise ArchiveError(f"corrupt index: unknown block kind {kind}")
        stored, pos = decode_varint(index, pos + 2, "index")
        size, pos = decode_varint(index, pos, "index")
        tokens, pos = decode_varint(index, pos, "index") if kind == BlockKind.LLM else (0, pos)
        blocks.append(BlockEntry(number, BlockKind(kind), flags, offset, stored, original, size, tokens))
        offset += stored
        original += size
    if pos != len(index) or original != total:
        raise ArchiveError("corrupt index: entries and totals disagree")
    start = index_start - offset - header_size
    for block in blocks:
        block.offset += start + header_size
    return StreamIndex(start, header_size, blocks, total, index_size)
