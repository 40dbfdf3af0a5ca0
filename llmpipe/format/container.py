"""Reading and writing the llmpipe container, version 2. ``FORMAT.md`` is the spec.

A stream is ``stream header | block* | index | footer``. The index lists
every block's stored size, original size and token count; the fixed-size
footer at the very end points back to it, so a seekable file can be listed,
sliced (``--range``) and resumed without reading its blocks, while a pipe
decodes front to back and checks the index against the blocks it saw.
Every length read from the input is checked against a limit before it is
used, so a damaged or hostile archive costs neither memory nor model time.
Concatenated streams form a valid archive.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from enum import IntEnum
from typing import BinaryIO

import zstandard

from llmpipe.errors import ArchiveError, TruncatedArchiveError

MAGIC = b"\xfaLLMP\x00"  # 0xFA is never valid UTF-8
FOOTER_MAGIC = b"PMLL"  # the stream magic's letters backwards, as the last bytes of every stream
VERSION = 2
MAX_HEADER_BYTES = 16 << 20  # compressed and decompressed header size limit
MAX_CHUNK_SIZE = 16 << 20  # largest chunk size a header may declare
MAX_WINDOW = 256 << 20  # largest window (batch x chunk size), and so the largest block
MAX_ROWS = 4096  # largest lockstep group
MAX_CONTEXT = 1 << 20  # largest context window a header may declare (tokens)
MAX_INDEX_BYTES = 1 << 30  # largest index a reader loads (about 100 million blocks)
FOOTER_SIZE = 16
_VARINT_MAX_BYTES = 9
STREAM_HEADER_FIXED = len(MAGIC) + 2 + 8


class BlockKind(IntEnum):
    INDEX = 0  # not a block: the index that ends a stream
    RAW = 1
    ZSTD = 2
    LLM = 3


FLAG_GROUP_START = 0x01  # LLM block that starts a lockstep group


def crc32(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def encode_varint(value: int) -> bytes:
    """Unsigned LEB128 of a value below 2^63 (at most 9 bytes)."""
    if not 0 <= value < 1 << 63:
        raise ValueError("varint out of range")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_varint(data: bytes, pos: int, what: str) -> tuple[int, int]:
    """The varint at ``data[pos:]`` and the position after it (for records already in memory)."""
    value = 0
    for i in range(_VARINT_MAX_BYTES):
        if pos >= len(data):
            raise ArchiveError(f"corrupt {what}: ends inside a number")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if byte == 0 and i > 0:
                raise ArchiveError(f"corrupt {what}: overlong number")
            return value, pos
    raise ArchiveError(f"corrupt {what}: number too long")


@dataclass
class Block:
    kind: BlockKind
    flags: int
    original_size: int
    payload: bytes
    token_count: int
    checksum: int  # CRC32 of the original bytes
    group_rows: int = 0  # rows of the lockstep group this block starts (GROUP_START blocks only)

    def to_bytes(self) -> bytes:
        head = bytearray([self.kind, self.flags])
        head += encode_varint(self.original_size) + encode_varint(len(self.payload))
        if self.kind == BlockKind.LLM:
            head += encode_varint(self.token_count)
        if self.flags & FLAG_GROUP_START:
            head += encode_varint(self.group_rows)
        head += struct.pack("<I", self.checksum)
        head += struct.pack("<I", crc32(bytes(head)))
        return bytes(head) + self.payload


def index_entry(kind: int, flags: int, stored_size: int, original_size: int, token_count: int) -> bytes:
    """One block's index entry: ``kind | flags | stored size | original size [| token count]``."""
    entry = bytes([kind, flags]) + encode_varint(stored_size) + encode_varint(original_size)
    return entry + encode_varint(token_count) if kind == BlockKind.LLM else entry


def stream_header_bytes(header: dict) -> bytes:
    """``magic | version | flags | u32 size | u32 crc | zstd(JSON header)``."""
    body = zstandard.ZstdCompressor(level=19).compress(
        json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    )
    if len(body) > MAX_HEADER_BYTES:
        raise ValueError("header too large")
    return MAGIC + bytes([VERSION, 0]) + struct.pack("<II", len(body), crc32(body)) + body


def index_and_footer_bytes(header_size: int, block_count: int, total_size: int, entries: bytes) -> bytes:
    head = bytes([BlockKind.INDEX, 0]) + encode_varint(header_size) + encode_varint(block_count)
    index = head + encode_varint(total_size) + entries
    index += struct.pack("<I", crc32(index))
    size = struct.pack("<Q", len(index))
    return index + struct.pack("<I", crc32(size)) + size + FOOTER_MAGIC


class GroupTracker:
    """Checks the lockstep-group rules of FORMAT.md section 3 as blocks go by."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.rows_missing = 0  # LLM blocks the open group still needs
        self.blocks_in_group = 0

    @property
    def open(self) -> bool:
        return self.rows_missing > 0

    def add(self, block: Block, number: int) -> None:
        if block.kind == BlockKind.LLM:
            if block.flags & FLAG_GROUP_START:
                if self.rows_missing:
                    raise ArchiveError(f"corrupt archive: block {number} starts a group inside another")
                self.rows_missing = block.group_rows
                self.blocks_in_group = 0
            elif not self.rows_missing:
                raise ArchiveError(f"corrupt archive: block {number} continues a group that never started")
            self.rows_missing -= 1
        self.blocks_in_group += 1
        if self.rows_missing and self.blocks_in_group > 2 * self.batch + 1:
            start = number - self.blocks_in_group + 1
            raise ArchiveError(f"corrupt archive: group at block {start} never completes")


@dataclass
class StreamWriter:
    """Writes one stream and remembers what its index needs; :meth:`resume` continues a partial one."""

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
        self.entries += index_entry(block.kind, block.flags, len(data), block.original_size, block.token_count)
        return len(data)

    def finish(self) -> int:
        data = index_and_footer_bytes(self.header_size, self.block_count, self.total_size, bytes(self.entries))
        self.sink.write(data)
        return len(data)


class ContainerReader:
    """Reads streams from a binary file object, front to back, without seeking.

    It checks every block header and, at the end of each stream, that the
    index lists exactly the blocks it read and that the footer points at it.
    """

    def __init__(self, source: BinaryIO, name: str, offset: int = 0) -> None:
        self._source = source
        self.name = name
        self.offset = offset  # bytes consumed so far (file offset when reading a file from there)
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

    def _varint(self, what: str, taken: bytearray) -> int:
        value = 0
        for i in range(_VARINT_MAX_BYTES):
            byte = self._read(1, what)[0]
            taken.append(byte)
            value |= (byte & 0x7F) << (7 * i)
            if not byte & 0x80:
                if byte == 0 and i > 0:
                    raise ArchiveError(f"corrupt {what}: overlong number at byte {self.offset - 1}")
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
        if version != VERSION:
            raise ArchiveError(f"unsupported format version {version} (this llmpipe reads version {VERSION})")
        if flags:
            raise ArchiveError(f"unsupported stream flags 0x{flags:02x} (reserved bits set)")
        size, checksum = struct.unpack("<II", self._read(8, "stream header"))
        if size > MAX_HEADER_BYTES:
            raise ArchiveError(f"corrupt header: size {size} exceeds the limit")
        body = self._read(size, "header")
        if crc32(body) != checksum:
            raise ArchiveError("corrupt header: CRC mismatch")
        try:
            text = zstandard.ZstdDecompressor().decompress(body, max_output_size=MAX_HEADER_BYTES)
            header = json.loads(text)
        except (zstandard.ZstdError, ValueError) as exc:
            raise ArchiveError(f"corrupt header: {exc}") from None
        if not isinstance(header, dict):
            raise ArchiveError("corrupt header: not an object")
        self.header_size = self.offset - start
        self.blocks = self.total = 0
        self.entries = bytearray()
        return header

    def read_block(self, max_size: int, max_rows: int) -> Block | None:
        """The next block, or None after the stream's index and footer were read and checked.

        A block holds at most ``max_size`` original bytes and a group at most
        ``max_rows`` rows; both are checked before the payload is read.
        """
        start = self.offset
        head = bytearray(self._read(2, "block header"))
        kind, flags = head
        if kind == BlockKind.INDEX:
            self._read_index(head)
            return None
        if kind not in (BlockKind.RAW, BlockKind.ZSTD, BlockKind.LLM):
            raise ArchiveError(f"corrupt block header: unknown block kind {kind} at byte {start}")
        allowed = FLAG_GROUP_START if kind == BlockKind.LLM else 0
        if flags & ~allowed:
            raise ArchiveError(f"corrupt block header: reserved flags 0x{flags:02x} set")
        original_size = self._varint("block header", head)
        payload_size = self._varint("block header", head)
        tokens = self._varint("block header", head) if kind == BlockKind.LLM else 0
        rows = self._varint("block header", head) if flags & FLAG_GROUP_START else 0
        content_crc = self._read(4, "block header")
        head += content_crc
        (header_crc,) = struct.unpack("<I", self._read(4, "block header"))
        if crc32(bytes(head)) != header_crc:
            raise ArchiveError(f"corrupt block header: CRC mismatch at byte {self.offset - 4}")
        if not 0 < original_size <= max_size:
            raise ArchiveError(f"corrupt block header: original size {original_size} outside 1..{max_size}")
        if payload_size > original_size or (kind == BlockKind.RAW and payload_size != original_size):
            raise ArchiveError(f"corrupt block header: payload size {payload_size} for {original_size} bytes")
        if kind == BlockKind.LLM and not 0 < tokens <= original_size:
            raise ArchiveError(f"corrupt block header: token count {tokens} out of range")
        if flags & FLAG_GROUP_START and not 0 < rows <= max_rows:
            raise ArchiveError(f"corrupt block header: group of {rows} rows out of range")
        payload = self._read(payload_size, "block payload")
        checksum = struct.unpack("<I", content_crc)[0]
        self.blocks += 1
        self.total += original_size
        self.entries += index_entry(kind, flags, self.offset - start, original_size, tokens)
        return Block(BlockKind(kind), flags, original_size, payload, tokens, checksum, rows)

    def _read_index(self, head: bytearray) -> None:
        """Read the index and footer and check them against the blocks read (never trusting its counts)."""
        start = self.offset - 2
        if head[1]:
            raise ArchiveError("corrupt index: reserved flags set")
        found = (self.header_size, self.blocks, self.total)
        said = tuple(self._varint("index", head) for _ in range(3))
        if said != found:
            raise ArchiveError(
                "corrupt index: says header {} bytes, {} blocks, {} bytes; found {}, {}, {}".format(*said, *found)
            )
        entries = self._read(len(self.entries), "index")
        if entries != self.entries:
            raise ArchiveError("corrupt index: it disagrees with the blocks")
        (checksum,) = struct.unpack("<I", self._read(4, "index"))
        if crc32(bytes(head) + entries) != checksum:
            raise ArchiveError("corrupt index: CRC mismatch")
        footer = self._read(FOOTER_SIZE, "footer")
        if footer[12:] != FOOTER_MAGIC or struct.unpack("<I", footer[:4])[0] != crc32(footer[4:12]):
            raise ArchiveError("corrupt footer")
        if struct.unpack("<Q", footer[4:12])[0] != self.offset - FOOTER_SIZE - start:
            raise ArchiveError("corrupt footer: index size mismatch")
