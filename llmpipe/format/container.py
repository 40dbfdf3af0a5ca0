"""Reading and writing the llmpipe container. ``FORMAT.md`` is the spec.

A stream is ``stream header | block* | index | footer``. Version 3 (written
now) has a binary header (``header``), one block per window holding that
window's rows (``block``), an index of each block's stored and original size,
and a 12-byte footer that points back to it, so a seekable file can be
listed, sliced (``--range``) and resumed without reading its blocks, while a
pipe decodes front to back and checks the index against the blocks it saw.
Version 2 streams (JSON header, one block per row) are still read.
Every length read from the input is checked against a limit before it is
used, so a damaged or hostile archive costs neither memory nor model time.
Concatenated streams form a valid archive, whatever their versions.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import BinaryIO

from llmpipe.errors import ArchiveError, TruncatedArchiveError
from llmpipe.format.block import BLOCK_MARKER, Block, Row, RowKind
from llmpipe.format.fields import MAX_HEADER_BYTES, VARINT_MAX_BYTES, crc32, encode_varint, unzigzag
from llmpipe.format.header import (
    MAGIC,
    READABLE_VERSIONS,
    VERSION,
    decode_json_header,
    decode_record,
    stream_header_bytes,
)

INDEX_MARKER = 0
FOOTER_MAGIC = {2: b"PMLL", 3: b"PML3"}  # the last bytes of every stream, by format version
FOOTER_SIZE = {2: 16, 3: 12}
V2_FLAG_GROUP_START = 0x01  # version 2: an LLM block that starts a lockstep group


def index_and_footer_bytes(header_size: int, entries: bytes) -> bytes:
    """Version 3: ``0 | S | entries`` then the footer ``u32 I | CRC32 of index and I | "PML3"``."""
    index = bytes([INDEX_MARKER]) + encode_varint(header_size) + entries
    size = struct.pack("<I", len(index))
    return index + size + struct.pack("<I", crc32(index + size)) + FOOTER_MAGIC[3]


@dataclass
class RowEntry:
    """A row as its block header describes it, before its payload is read."""

    kind: RowKind
    payload_size: int
    token_count: int = 0
    original_size: int = 0  # known before decoding for raw rows and version 2 rows only


@dataclass
class BlockHeader:
    original_size: int
    checksum: int
    rows: list[RowEntry]
    group_rows: int  # as :attr:`Block.group_rows`


@dataclass
class StreamWriter:
    """Writes one version 3 stream and remembers what its index needs; :meth:`continuing` resumes one."""

    sink: BinaryIO
    header_size: int = 0
    size: int = 0  # bytes of the stream so far (header and blocks)
    block_count: int = 0
    total_size: int = 0
    entries: bytearray = field(default_factory=bytearray)

    @classmethod
    def continuing(cls, sink: BinaryIO, reader: ContainerReader) -> StreamWriter:
        """A writer that continues the stream ``reader`` is reading from ``sink`` after what it has read so
        far (the header and whole blocks): how ``--resume`` keeps a partial archive."""
        return cls(sink, reader.header_size, reader.offset, reader.blocks, reader.total, bytearray(reader.entries))

    def write_header(self, header: dict) -> int:
        data = stream_header_bytes(header)
        self.sink.write(data)
        self.header_size = self.size = len(data)
        return len(data)

    def write_block(self, block: Block) -> int:
        data = block.to_bytes()
        self.sink.write(data)
        self.size += len(data)
        self.block_count += 1
        self.total_size += block.original_size
        self.entries += block.index_entry(len(data))
        return len(data)

    def finish(self) -> int:
        data = index_and_footer_bytes(self.header_size, bytes(self.entries))
        self.sink.write(data)
        return len(data)


class ContainerReader:
    """Reads streams from a binary file object, front to back, without seeking.

    It checks every block header and, at the end of each stream, that the
    index lists exactly the blocks it read and that the footer points at it.
    """

    def __init__(
        self, source: BinaryIO, name: str, offset: int = 0, version: int = VERSION, has_model: bool = True
    ) -> None:
        """``version`` and ``has_model``: of the stream being read, when starting after its header."""
        self._source = source
        self.name = name
        self.offset = offset  # bytes consumed so far (file offset when reading a file from there)
        self.version = version  # of the current stream
        self.has_model = has_model  # whether the current stream's header names a model
        self.header_size = 0  # the current stream's header bytes
        self.blocks = 0  # blocks read in the current stream
        self.total = 0  # their original bytes
        self.entries = bytearray()

    def _read(self, size: int, what: str) -> bytes:
        data = self._source.read(size)
        while len(data) < size:  # pipes may return short reads
            more = self._source.read(size - len(data))
            if not more:
                raise TruncatedArchiveError(
                    f"truncated archive: unexpected end of input in {what} at byte {self.offset + len(data)}"
                )
            data += more
        self.offset += size
        return data

    def _varint(self, what: str, taken: bytearray, limit: int = (1 << 63) - 1) -> int:
        value = 0
        for i in range(VARINT_MAX_BYTES):
            byte = self._read(1, what)[0]
            taken.append(byte)
            value |= (byte & 0x7F) << (7 * i)
            if not byte & 0x80:
                if byte == 0 and i > 0:
                    raise ArchiveError(f"corrupt {what}: overlong number at byte {self.offset - 1}")
                if value > limit:
                    raise ArchiveError(f"corrupt {what}: number {value} above {limit} at byte {self.offset - 1}")
                return value
        raise ArchiveError(f"corrupt {what}: number too long at byte {self.offset}")

    def read_stream_header(self, first: bool) -> dict | None:
        """The next stream's header, or None at a clean end of input (after at least one stream)."""
        start = self.offset
        magic = self._source.read(len(MAGIC))
        while magic and len(magic) < len(MAGIC) and (more := self._source.read(len(MAGIC) - len(magic))):
            magic += more
        if not magic:
            if first:
                raise TruncatedArchiveError("empty input: not an llmpipe archive")
            return None
        self.offset += len(magic)
        if magic != MAGIC:
            if not first:
                raise ArchiveError("trailing garbage after the end of the archive")
            if MAGIC.startswith(magic):
                raise TruncatedArchiveError("truncated archive: unexpected end of input in magic")
            raise ArchiveError("not an llmpipe archive (wrong magic)")
        version, flags = self._read(2, "stream header")
        if version not in READABLE_VERSIONS:
            raise ArchiveError(f"unsupported format version {version} (this llmpipe reads versions 2 and 3)")
        allowed = 0 if version == 2 else 0x01
        if flags & ~allowed:
            raise ArchiveError(f"unsupported stream flags 0x{flags:02x} (reserved bits set)")
        if version == 2:
            size, checksum = struct.unpack("<II", self._read(8, "stream header"))
            if size > MAX_HEADER_BYTES:
                raise ArchiveError(f"corrupt header: size {size} exceeds the limit")
            body = self._read(size, "header")
            if crc32(body) != checksum:
                raise ArchiveError("corrupt header: CRC mismatch")
            header = decode_json_header(body, MAX_HEADER_BYTES)
        else:
            taken = bytearray([version, flags])
            size = self._varint("stream header", taken, MAX_HEADER_BYTES)
            record = self._read(size, "header")
            (checksum,) = struct.unpack("<I", self._read(4, "header"))
            if crc32(bytes(taken) + record) != checksum:
                raise ArchiveError("corrupt header: CRC mismatch")
            header = decode_record(flags, record)
        self.version = version
        self.has_model = header.get("model") is not None
        self.header_size = self.offset - start
        self.blocks = self.total = 0
        self.entries = bytearray()
        return header

    def read_block(self, max_size: int, max_rows: int) -> Block | None:
        """The next block with its payloads, or None after the stream's index and footer were read and checked.

        A block holds at most ``max_size`` original bytes and a group at most
        ``max_rows`` rows; both are checked before any payload is read.
        """
        start = self.offset
        head = self.read_block_header(max_size, max_rows)
        if head is None:
            return None
        rows = [
            Row(e.kind, self._read(e.payload_size, "block payload"), e.token_count, e.original_size) for e in head.rows
        ]
        self._count(start, head)
        return Block(rows, head.original_size, head.checksum, head.group_rows)

    def read_block_header(self, max_size: int, max_rows: int) -> BlockHeader | None:
        """The next block's header (its payloads not read), or None at the index, which is then read."""
        start = self.offset
        head = bytearray(self._read(1, "block header"))
        if head[0] == INDEX_MARKER:
            self._read_index(head, start)
            return None
        if self.version == 2:
            return self._v2_block_header(head, max_size, max_rows)
        if head[0] != BLOCK_MARKER:
            raise ArchiveError(f"corrupt block header: unknown marker {head[0]} at byte {start}")
        size = self._varint("block header", head, max_size)
        count = self._varint("block header", head, max_rows)
        entries = []
        for _ in range(count):
            value = self._varint("block header", head, (max_size << 2) | 3)
            kind, amount = value & 3, value >> 2
            if kind == RowKind.LLM:
                entries.append(RowEntry(RowKind.LLM, self._varint("block header", head, max_size), amount))
            elif kind in (RowKind.RAW, RowKind.ZSTD):
                entries.append(RowEntry(RowKind(kind), amount, 0, amount if kind == RowKind.RAW else 0))
            else:
                raise ArchiveError(f"corrupt block header: unknown row kind {kind} at byte {self.offset - 1}")
        llm = [e for e in entries if e.kind == RowKind.LLM]
        base = self._varint("block header", head, max_size) if llm else 0
        for entry in llm:
            entry.token_count = base + unzigzag(entry.token_count)
        checksum = self._read(4, "block header")
        head += checksum
        (header_crc,) = struct.unpack("<I", self._read(4, "block header"))
        if crc32(bytes(head)) != header_crc:
            raise ArchiveError(f"corrupt block header: CRC mismatch at byte {self.offset - 4}")
        self._check_rows(size, entries, max_size, max_rows)
        return BlockHeader(size, struct.unpack("<I", checksum)[0], entries, len(llm))

    def _check_rows(self, size: int, rows: list[RowEntry], max_size: int, max_rows: int) -> None:
        """What a version 3 block header may claim (FORMAT.md section 3), before any payload is read."""
        if not 0 < size <= max_size:
            raise ArchiveError(f"corrupt block header: original size {size} outside 1..{max_size}")
        if not 0 < len(rows) <= min(max_rows, size):
            raise ArchiveError(f"corrupt block header: {len(rows)} rows for {size} bytes")
        symbols = [e.token_count for e in rows if e.kind == RowKind.LLM]
        if symbols and not self.has_model:
            raise ArchiveError("corrupt block header: an LLM row in a stream without a model")
        if any(t < 1 for t in symbols) or sum(symbols) > size:
            raise ArchiveError("corrupt block header: token counts out of range")
        if any(e.payload_size < 1 for e in rows if e.kind != RowKind.LLM):
            raise ArchiveError("corrupt block header: an empty row")
        if sum(e.payload_size for e in rows) > size:
            raise ArchiveError("corrupt block header: payloads larger than the block")

    def _v2_block_header(self, head: bytearray, max_size: int, max_rows: int) -> BlockHeader:
        """A version 2 block: ``kind | flags | n | p | [t] | [r] | content CRC | header CRC``, one row."""
        kind = head[0]
        if kind not in (RowKind.RAW, RowKind.ZSTD, RowKind.LLM):
            raise ArchiveError(f"corrupt block header: unknown block kind {kind} at byte {self.offset - 1}")
        head += self._read(1, "block header")
        flags = head[1]
        allowed = V2_FLAG_GROUP_START if kind == RowKind.LLM else 0
        if flags & ~allowed:
            raise ArchiveError(f"corrupt block header: reserved flags 0x{flags:02x} set")
        original_size = self._varint("block header", head)
        payload_size = self._varint("block header", head)
        tokens = self._varint("block header", head) if kind == RowKind.LLM else 0
        rows = self._varint("block header", head) if flags & V2_FLAG_GROUP_START else 0
        content_crc = self._read(4, "block header")
        head += content_crc
        (header_crc,) = struct.unpack("<I", self._read(4, "block header"))
        if crc32(bytes(head)) != header_crc:
            raise ArchiveError(f"corrupt block header: CRC mismatch at byte {self.offset - 4}")
        if not 0 < original_size <= max_size:
            raise ArchiveError(f"corrupt block header: original size {original_size} outside 1..{max_size}")
        if payload_size > original_size or (kind == RowKind.RAW and payload_size != original_size):
            raise ArchiveError(f"corrupt block header: payload size {payload_size} for {original_size} bytes")
        if kind == RowKind.LLM and not 0 < tokens <= original_size:
            raise ArchiveError(f"corrupt block header: token count {tokens} out of range")
        if flags & V2_FLAG_GROUP_START and not 0 < rows <= max_rows:
            raise ArchiveError(f"corrupt block header: group of {rows} rows out of range")
        entry = RowEntry(RowKind(kind), payload_size, tokens, original_size)
        return BlockHeader(original_size, struct.unpack("<I", content_crc)[0], [entry], rows)

    def _count(self, start: int, head: BlockHeader) -> None:
        """A whole block was read: what the index must say of it."""
        self.blocks += 1
        self.total += head.original_size
        stored = self.offset - start
        if self.version == 2:
            row = head.rows[0]
            entry = bytes([row.kind, V2_FLAG_GROUP_START if head.group_rows else 0])
            entry += encode_varint(stored) + encode_varint(row.original_size)
            self.entries += entry + encode_varint(row.token_count) if row.kind == RowKind.LLM else entry
        else:
            self.entries += encode_varint(stored) + encode_varint(head.original_size)

    def _read_index(self, head: bytearray, start: int) -> None:
        """Read the index and footer and check them against the blocks read (never trusting its counts)."""
        if self.version == 2:
            head += self._read(1, "index")
            if head[1]:
                raise ArchiveError("corrupt index: reserved flags set")
            found = (self.header_size, self.blocks, self.total)
            said = tuple(self._varint("index", head) for _ in range(3))
            if said != found:
                raise ArchiveError(
                    "corrupt index: says header {} bytes, {} blocks, {} bytes; found {}, {}, {}".format(*said, *found)
                )
        elif (said_header := self._varint("index", head)) != self.header_size:
            raise ArchiveError(f"corrupt index: says header {said_header} bytes; found {self.header_size}")
        entries = self._read(len(self.entries), "index")
        if entries != self.entries:
            raise ArchiveError("corrupt index: it disagrees with the blocks")
        index = bytes(head) + entries
        if self.version == 2:
            (checksum,) = struct.unpack("<I", self._read(4, "index"))
            if crc32(index) != checksum:
                raise ArchiveError("corrupt index: CRC mismatch")
            footer = self._read(FOOTER_SIZE[2], "footer")
            size, valid = footer[4:12], struct.unpack("<I", footer[:4])[0] == crc32(footer[4:12])
            size_value = struct.unpack("<Q", size)[0]
        else:
            footer = self._read(FOOTER_SIZE[3], "footer")
            size, valid = footer[:4], struct.unpack("<I", footer[4:8])[0] == crc32(index + footer[:4])
            size_value = struct.unpack("<I", size)[0]
        if footer[-4:] != FOOTER_MAGIC[self.version] or not valid:
            raise ArchiveError("corrupt footer")
        if size_value != self.offset - FOOTER_SIZE[self.version] - start:
            raise ArchiveError("corrupt footer: index size mismatch")

