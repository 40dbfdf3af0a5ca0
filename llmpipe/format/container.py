"""Reading and writing the llmpipe container, version 1. ``FORMAT.md`` is the spec.

A stream is ``magic | version | flags | header | block* | end record``.
Every length read from the input is checked against a limit before it is
used, so a damaged or hostile archive costs neither memory nor model time.
Concatenated streams form a valid archive.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum
from typing import BinaryIO

import zstandard

from llmpipe.errors import ArchiveError

MAGIC = b"\xfaLLMP\x00"  # 0xFA is never valid UTF-8
VERSION = 1
MAX_HEADER_BYTES = 16 << 20  # compressed and decompressed header size limit
MAX_CHUNK_SIZE = 16 << 20  # largest chunk size a header may declare
MAX_WINDOW = 256 << 20  # largest window (batch x chunk size), and so the largest block
MAX_ROWS = 4096  # largest lockstep group
_VARINT_MAX_BYTES = 9


class BlockKind(IntEnum):
    END = 0
    RAW = 1
    ZSTD = 2
    LLM = 3


FLAG_GROUP_START = 0x01  # LLM block that starts a lockstep group (float engine)


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


def stream_header_bytes(header: dict) -> bytes:
    """``magic | version | flags | u32 size | u32 crc | zstd(JSON header)``."""
    body = zstandard.ZstdCompressor(level=19).compress(
        json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    )
    if len(body) > MAX_HEADER_BYTES:
        raise ValueError("header too large")
    return MAGIC + bytes([VERSION, 0]) + struct.pack("<II", len(body), crc32(body)) + body


def end_record_bytes(block_count: int, total_size: int) -> bytes:
    head = bytes([BlockKind.END, 0]) + encode_varint(block_count) + encode_varint(total_size)
    return head + struct.pack("<I", crc32(head))


class ContainerReader:
    """Reads streams from a binary file object, front to back, without seeking."""

    def __init__(self, source: BinaryIO, name: str) -> None:
        self._source = source
        self.name = name
        self.offset = 0  # bytes consumed so far, for error messages

    def _read(self, size: int, what: str) -> bytes:
        data = self._source.read(size)
        while len(data) < size:  # pipes may return short reads
            more = self._source.read(size - len(data))
            if not more:
                raise ArchiveError(
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
        magic = self._source.read(len(MAGIC))
        while magic and len(magic) < len(MAGIC) and (more := self._source.read(len(MAGIC) - len(magic))):
            magic += more
        if not magic:
            if first:
                raise ArchiveError("empty input: not an llmpipe archive")
            return None
        self.offset += len(magic)
        if magic != MAGIC:
            if not first:
                raise ArchiveError("trailing garbage after the end of the archive")
            if MAGIC.startswith(magic):
                raise ArchiveError("truncated archive: unexpected end of input in magic")
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
        return header

    def read_block(self, max_size: int, max_rows: int) -> Block | tuple[int, int]:
        """The next block, or ``(block_count, total_size)`` from the end record.

        A block holds at most ``max_size`` original bytes and a group at most
        ``max_rows`` rows; both are checked before the payload is read.
        """
        head = bytearray(self._read(2, "block header"))
        kind, flags = head
        if kind == BlockKind.END:
            if flags:
                raise ArchiveError("corrupt end record: reserved flags set")
            count = self._varint("end record", head)
            total = self._varint("end record", head)
            (checksum,) = struct.unpack("<I", self._read(4, "end record"))
            if crc32(bytes(head)) != checksum:
                raise ArchiveError("corrupt end record: CRC mismatch")
            return count, total
        if kind not in (BlockKind.RAW, BlockKind.ZSTD, BlockKind.LLM):
            raise ArchiveError(f"corrupt block header: unknown block kind {kind} at byte {self.offset - 2}")
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
        return Block(BlockKind(kind), flags, original_size, payload, tokens, checksum, rows)
