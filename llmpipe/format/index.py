"""The index of a seekable archive, read from the end: where every block is, in the file and the original.

``-l``, ``--range``, ``--resume`` of decompression and ``--keep-going``
find blocks through it without reading the archive front to back
(FORMAT.md, "Index" and "Footer"). Each stream's footer says its version.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import BinaryIO

from llmpipe.errors import ArchiveError
from llmpipe.format.block import RowKind
from llmpipe.format.container import (
    FOOTER_MAGIC,
    FOOTER_SIZE,
    INDEX_MARKER,
    V2_FLAG_GROUP_START,
    ContainerReader,
    RowEntry,
)
from llmpipe.format.fields import MAX_INDEX_BYTES, MAX_ROWS, MAX_WINDOW, crc32, decode_varint

MIN_STREAM_BYTES = 13 + 2 + FOOTER_SIZE[3]  # a version 3 header without a model, an empty index, the footer


@dataclass
class BlockEntry:
    """A block as the index describes it, located in the file and in the original."""

    number: int  # 1-based within its stream
    offset: int  # file offset of the block header
    stored_size: int  # block header and payloads
    original_offset: int  # within the whole archive's content (all streams)
    original_size: int
    kind: RowKind | None = None  # version 2 only: the block's (one row's) kind; a version 3 block holds rows
    group_start: bool = True  # starts a lockstep group (every version 3 block; version 2: GROUP_START)
    token_count: int = 0  # version 2 LLM blocks


@dataclass
class StreamIndex:
    """One stream of a seekable archive, read from its footer and index only."""

    start: int  # file offset of the stream's magic
    version: int
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
        if end < MIN_STREAM_BYTES:
            raise ArchiveError("no index: the archive is truncated or has trailing data")
        source.seek(end - 4)
        last = source.read(4)
        version = next((v for v, magic in FOOTER_MAGIC.items() if magic == last), None)
        if version is None:
            raise ArchiveError("no index: the archive is truncated or has trailing data (footer not found)")
        source.seek(end - FOOTER_SIZE[version])
        footer = source.read(FOOTER_SIZE[version])
        index_size = struct.unpack("<Q" if version == 2 else "<I", footer[4:12] if version == 2 else footer[:4])[0]
        index_start = end - FOOTER_SIZE[version] - index_size
        if not (6 if version == 2 else 2) <= index_size <= MAX_INDEX_BYTES or index_start < 0:
            raise ArchiveError("corrupt footer: index size out of range")
        source.seek(index_start)
        index = source.read(index_size)
        if version == 2:
            valid = crc32(footer[4:12]) == struct.unpack("<I", footer[:4])[0]
            valid = valid and crc32(index[:-4]) == struct.unpack("<I", index[-4:])[0] and index[1] == 0
            index = index[:-4]
        else:
            valid = crc32(index + footer[:4]) == struct.unpack("<I", footer[4:8])[0]
        if not valid or index[0] != INDEX_MARKER:
            raise ArchiveError("corrupt index: CRC mismatch")
        stream = _parse_index(index, version, index_start, end - index_start)
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
        if reader.header_size != stream.header_size or reader.version != stream.version:
            raise ArchiveError("corrupt index: header size or version disagrees with the header")
        stream.header = header or {}
        for block in stream.blocks:
            block.original_offset += base
        base += stream.original_size
    return streams


def _parse_index(index: bytes, version: int, index_start: int, index_size: int) -> StreamIndex:
    """Version 3: ``0 | S | (stored, original)*``; version 2: ``0 | 0 | S | N | total | entries``."""
    pos = 1 if version == 3 else 2
    header_size, pos = decode_varint(index, pos, "index")
    count = total = None
    if version == 2:
        count, pos = decode_varint(index, pos, "index")
        total, pos = decode_varint(index, pos, "index")
        if count > len(index):  # every entry takes at least four bytes
            raise ArchiveError("corrupt index: block count out of range")
    blocks: list[BlockEntry] = []
    offset = original = 0
    while (len(blocks) < count) if count is not None else pos < len(index):
        if version == 2:
            if pos + 2 > len(index):
                raise ArchiveError("corrupt index: ends inside an entry")
            kind, flags = index[pos], index[pos + 1]
            if kind not in (RowKind.RAW, RowKind.ZSTD, RowKind.LLM):
                raise ArchiveError(f"corrupt index: unknown block kind {kind}")
            stored, pos = decode_varint(index, pos + 2, "index")
            size, pos = decode_varint(index, pos, "index")
            tokens, pos = decode_varint(index, pos, "index") if kind == RowKind.LLM else (0, pos)
            starts = kind == RowKind.LLM and bool(flags & V2_FLAG_GROUP_START)
            entry = BlockEntry(len(blocks) + 1, offset, stored, original, size, RowKind(kind), starts, tokens)
        else:
            stored, pos = decode_varint(index, pos, "index")
            size, pos = decode_varint(index, pos, "index")
            entry = BlockEntry(len(blocks) + 1, offset, stored, original, size)
        blocks.append(entry)
        offset += stored
        original += size
    if pos != len(index) or total is not None and original != total:
        raise ArchiveError("corrupt index: entries and totals disagree")
    start = index_start - offset - header_size
    for block in blocks:
        block.offset += start + header_size
    return StreamIndex(start, version, header_size, blocks, original, index_size)


def block_rows(source: BinaryIO, name: str, stream: StreamIndex) -> list[list[RowEntry]]:
    """Every block's rows as its header describes them, payloads not read (``-l``).

    Version 2 blocks are one row each and their index says all (the payload
    size given is then the whole stored block, its header included).
    """
    if stream.version == 2:
        return [[RowEntry(b.kind or RowKind.RAW, b.stored_size, b.token_count, b.original_size)] for b in stream.blocks]
    found = []
    has_model = stream.header.get("model") is not None
    for block in stream.blocks:
        source.seek(block.offset)
        head = ContainerReader(source, name, block.offset, 3, has_model).read_block_header(MAX_WINDOW, MAX_ROWS)
        if head is None:
            raise ArchiveError(f"corrupt index: block {block.number} is not where it says")
        found.append(head.rows)
    return found
