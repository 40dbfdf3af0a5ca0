import io

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmpipe.errors import ArchiveError
from llmpipe.format.container import (
    Block,
    BlockKind,
    ContainerReader,
    StreamWriter,
    crc32,
    encode_varint,
    index_and_footer_bytes,
    index_entry,
    stream_header_bytes,
)
from llmpipe.format.index import read_archive_index

HEADER = {"chunk_size": 64, "model": {}, "numerics": {"batch": 1}}


def _archive(blocks: list[Block]) -> bytes:
    sink = io.BytesIO()
    writer = StreamWriter(sink)
    writer.write_header(HEADER)
    for block in blocks:
        writer.write_block(block)
    writer.finish()
    return sink.getvalue()


def _read_all(data: bytes):
    reader = ContainerReader(io.BytesIO(data), "test")
    header = reader.read_stream_header(first=True)
    records = []
    while True:
        record = reader.read_block(64, 4)
        if record is None:
            return header, records
        records.append(record)


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
    assert records == blocks


def test_index_locates_every_block_of_concatenated_streams():
    blocks = [Block(BlockKind.RAW, 0, 3, b"abc", 0, crc32(b"abc")), Block(BlockKind.LLM, 1, 40, b"\x01", 7, 5, 3)]
    one = _archive(blocks)
    streams = read_archive_index(io.BytesIO(one + one), "t")
    assert [s.start for s in streams] == [0, len(one)]
    assert [s.stored_size for s in streams] == [len(one), len(one)]
    entries = [b for s in streams for b in s.blocks]
    assert [b.original_offset for b in entries] == [0, 3, 43, 46]
    assert [b.token_count for b in entries] == [0, 7, 0, 7]
    for entry, block in zip(entries, blocks * 2, strict=True):
        assert (one + one)[entry.offset : entry.offset + entry.stored_size] == block.to_bytes()
    assert streams[1].header == HEADER


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d[:-1], "footer not found"),
        (lambda d: d + b"x", "footer not found"),
        (lambda d: d[:-10] + bytes([d[-10] ^ 4]) + d[-9:], "footer not found"),
        (lambda d: d[:-22] + bytes([d[-22] ^ 4]) + d[-21:], "index: CRC"),
        (lambda d: d[5:], "more data than the file holds"),
    ],
)
def test_damaged_index_or_footer_is_refused(mutate, message):
    data = _archive([Block(BlockKind.RAW, 0, 3, b"abc", 0, crc32(b"abc"))] * 3)
    with pytest.raises(ArchiveError, match=message):
        read_archive_index(io.BytesIO(mutate(data)), "t")


def test_an_index_that_disagrees_with_the_blocks_is_refused_front_to_back():
    good = Block(BlockKind.RAW, 0, 3, b"abc", 0, crc32(b"abc"))
    head = stream_header_bytes(HEADER)
    entry = index_entry(BlockKind.RAW, 0, len(good.to_bytes()), 3, 0)
    body = head + good.to_bytes() + good.to_bytes()
    with pytest.raises(ArchiveError, match="index: says"):
        _read_all(body + index_and_footer_bytes(len(head), 1, 3, entry))
    other = index_entry(BlockKind.ZSTD, 0, len(good.to_bytes()), 3, 0)
    with pytest.raises(ArchiveError, match="disagrees"):
        _read_all(body + index_and_footer_bytes(len(head), 2, 6, entry + other))
    _read_all(body + index_and_footer_bytes(len(head), 2, 6, entry + entry))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: b"", "empty input"),
        (lambda d: b"PK\x03\x04" + d[4:], "wrong magic"),
        (lambda d: d[:6] + b"\x01" + d[7:], "unsupported format version 1"),
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
            while reader.read_block(64, 4) is not None:
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
