import io

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmpipe.errors import ArchiveError
from llmpipe.format.container import (
    MAGIC,
    Block,
    BlockKind,
    ContainerReader,
    crc32,
    encode_varint,
    end_record_bytes,
    stream_header_bytes,
)

HEADER = {"chunk_size": 64, "model": {}, "numerics": {"batch": 1}}


def _archive(blocks: list[Block]) -> bytes:
    total = sum(b.original_size for b in blocks)
    return stream_header_bytes(HEADER) + b"".join(b.to_bytes() for b in blocks) + end_record_bytes(len(blocks), total)


def _read_all(data: bytes):
    reader = ContainerReader(io.BytesIO(data), "test")
    header = reader.read_stream_header(first=True)
    records = []
    while True:
        record = reader.read_block(64, 4)
        records.append(record)
        if not isinstance(record, Block):
            return header, records


@given(st.integers(0, 2**63 - 1))
def test_varint_round_trip(value):
    data = encode_varint(value)
    reader = ContainerReader(io.BytesIO(data), "t")
    assert reader._varint("x", bytearray()) == value


def test_blocks_round_trip():
    blocks = [
        Block(BlockKind.RAW, 0, 3, b"abc", 0, crc32(b"abc")),
        Block(BlockKind.LLM, 1, 40, b"\x01\x02", 7, 1234, 3),
        Block(BlockKind.ZSTD, 0, 64, b"z" * 10, 0, 99),
    ]
    header, records = _read_all(_archive(blocks))
    assert header == HEADER
    assert records[:-1] == blocks
    assert records[-1] == (3, 107)


def test_magic_has_no_valid_utf8():
    with pytest.raises(UnicodeDecodeError):
        MAGIC.decode("utf-8")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: b"", "empty input"),
        (lambda d: b"PK\x03\x04" + d[4:], "wrong magic"),
        (lambda d: d[:6] + b"\x02" + d[7:], "unsupported format version 2"),
        (lambda d: d[:7] + b"\x80" + d[8:], "reserved bits"),
        (lambda d: d[:12] + bytes([d[12] ^ 1]) + d[13:], "header: CRC"),
        (lambda d: d[:-1], "truncated"),
        (lambda d: d + b"junk", "trailing garbage"),
    ],
)
def test_damaged_archives_are_refused(mutate, message):
    data = _archive([Block(BlockKind.RAW, 0, 3, b"abc", 0, crc32(b"abc"))])
    with pytest.raises(ArchiveError, match=message):
        reader = ContainerReader(io.BytesIO(mutate(data)), "t")
        first = True
        while reader.read_stream_header(first) is not None:
            first = False
            while isinstance(reader.read_block(64, 4), Block):
                pass


def test_sizes_beyond_limits_are_refused_before_reading_payload():
    block = Block(BlockKind.LLM, 1, 60, b"x", 61, 0, 1)  # more tokens than bytes
    with pytest.raises(ArchiveError, match="token count"):
        _read_all(_archive([block]))
    huge = Block(BlockKind.ZSTD, 0, 10**9, b"x", 0, 0)
    with pytest.raises(ArchiveError, match="original size"):
        _read_all(_archive([huge]))


def test_every_truncation_and_bit_flip_is_detected():
    data = _archive([Block(BlockKind.RAW, 0, 5, b"hello", 0, crc32(b"hello"))])
    for cut in range(len(data)):
        with pytest.raises(ArchiveError):
            _read_all(data[:cut])
    for position in range(len(data)):
        for bit in range(8):
            damaged = bytearray(data)
            damaged[position] ^= 1 << bit
            try:
                _, records = _read_all(bytes(damaged))
            except ArchiveError:
                continue
            # the only undetected flips may be in the raw payload, which the block checksum catches
            block = records[0]
            assert crc32(block.payload) != block.checksum
