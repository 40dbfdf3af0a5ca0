"""The archive's small building blocks: CRC32, varints, limits, and a cursor over a record held in memory.

Every length read from an archive is checked against one of these limits
before it is used, so a damaged or hostile archive costs neither memory nor
model time (FORMAT.md, section 1).
"""

from __future__ import annotations

import struct
import zlib

from llmpipe.errors import ArchiveError

MAX_HEADER_BYTES = 16 << 20  # stream header record (and a version 2 header, compressed or not)
MAX_CHUNK_SIZE = 16 << 20  # largest chunk size a header may declare
MAX_WINDOW = 256 << 20  # largest window (batch x chunk size), and so the largest block
MAX_ROWS = 4096  # largest lockstep group
MAX_CONTEXT = 1 << 20  # largest context window a header may declare (tokens)
MAX_INDEX_BYTES = 1 << 30  # largest index a reader loads (about 100 million blocks)
VARINT_MAX_BYTES = 9


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
    for i in range(VARINT_MAX_BYTES):
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


def zigzag(value: int) -> int:
    """A signed integer as an unsigned one, small magnitudes small: 0, -1, 1, -2 ... -> 0, 1, 2, 3 ..."""
    return 2 * value if value >= 0 else -2 * value - 1


def unzigzag(value: int) -> int:
    return value >> 1 if not value & 1 else -(value >> 1) - 1


class RecordWriter:
    """Appends fields to a binary record: varints, signed varints, bytes, strings, float64."""

    def __init__(self) -> None:
        self.data = bytearray()

    def varint(self, value: int) -> RecordWriter:
        self.data += encode_varint(value)
        return self

    def signed(self, value: int) -> RecordWriter:
        return self.varint(zigzag(value))

    def byte(self, value: int) -> RecordWriter:
        self.data.append(value)
        return self

    def raw(self, value: bytes) -> RecordWriter:
        self.data += value
        return self

    def blob(self, value: bytes) -> RecordWriter:
        """A length-prefixed byte string."""
        return self.varint(len(value)).raw(value)

    def text(self, value: str) -> RecordWriter:
        return self.blob(value.encode("utf-8"))

    def float64(self, value: float) -> RecordWriter:
        return self.raw(struct.pack("<d", value))


class RecordReader:
    """Reads the fields :class:`RecordWriter` writes from a record in memory; every read is bounds-checked.

    ``what`` names the record in errors (``corrupt header: ...``).
    """

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def fail(self, detail: str) -> ArchiveError:
        return ArchiveError(f"corrupt {self.what}: {detail}")

    def varint(self, limit: int = (1 << 63) - 1) -> int:
        value, self.pos = decode_varint(self.data, self.pos, self.what)
        if value > limit:
            raise self.fail(f"number {value} above its limit {limit}")
        return value

    def signed(self, bound: int) -> int:
        """A zigzag varint with ``|value| <= bound``."""
        value = unzigzag(self.varint(2 * bound + 1))
        if abs(value) > bound:
            raise self.fail(f"number {value} out of range")
        return value

    def byte(self) -> int:
        return self.raw(1)[0]

    def raw(self, size: int) -> bytes:
        if size > len(self.data) - self.pos:
            raise self.fail("ends inside a field")
        value = self.data[self.pos : self.pos + size]
        self.pos += size
        return bytes(value)

    def blob(self, limit: int) -> bytes:
        return self.raw(self.varint(limit))

    def text(self, limit: int) -> str:
        try:
            return self.blob(limit).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail("text is not UTF-8") from None

    def float64(self) -> float:
        return struct.unpack("<d", self.raw(8))[0]

    @property
    def left(self) -> int:
        return len(self.data) - self.pos
