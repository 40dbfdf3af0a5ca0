"""The container, version 3 (and version 2 read through a committed golden archive)."""

import base64
import io
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmpipe.errors import ArchiveError
from llmpipe.format.block import Block, Row, RowKind
from llmpipe.format.container import ContainerReader, StreamWriter, index_and_footer_bytes
from llmpipe.format.fields import RecordReader, crc32, encode_varint
from llmpipe.format.header import stream_header_bytes
from llmpipe.format.index import block_rows, read_archive_index
from tests.format.test_header import header
from tests.golden_archives import GOLDEN

HEADER = header(chunk_size=64, batch=4)


def _archive(blocks: list[Block], head: dict = HEADER) -> bytes:
    sink = io.BytesIO()
    writer = StreamWriter(sink)
    writer.write_header(head)
    for block in blocks:
        writer.write_block(block)
    writer.finish()
    return sink.getvalue()


def _read_all(data: bytes, max_size: int = 256):
    reader = ContainerReader(io.BytesIO(data), "test")
    head = reader.read_stream_header(first=True)
    records = []
    while True:
        record = reader.read_block(max_size, 4)
        if record is None:
            return head, records
        records.append(record)


def _raw(data: bytes) -> Block:
    return Block([Row(RowKind.RAW, data, 0, len(data))], len(data), crc32(data))


def _llm_block(counts: list[int]) -> Block:
    rows = [Row(RowKind.LLM, bytes([n % 251]) * (n % 7), n) for n in counts]
    return Block(rows, 4 * sum(counts), 1234, len(rows))


@given(st.integers(0, 2**63 - 1))
def test_varint_round_trip(value):
    assert RecordReader(encode_varint(value), "x").varint() == value


row = st.one_of(
    st.builds(lambda data: Row(RowKind.RAW, data, 0, len(data)), st.binary(min_size=1, max_size=20)),
    st.builds(lambda data: Row(RowKind.ZSTD, data), st.binary(min_size=1, max_size=20)),
    st.builds(lambda data, t: Row(RowKind.LLM, data, t), st.binary(max_size=20), st.integers(1, 30)),
)


@given(st.lists(st.lists(row, min_size=1, max_size=4), min_size=0, max_size=4), st.integers(0, 2**32 - 1))
def test_blocks_round_trip(rows_of_blocks, checksum):
    blocks = []
    for rows in rows_of_blocks:
        size = sum(len(r.payload) + r.token_count for r in rows)
        blocks.append(Block(rows, size, checksum, sum(r.kind == RowKind.LLM for r in rows)))
    head, records = _read_all(_archive(blocks), max_size=1000)
    assert head == HEADER
    assert records == blocks


def test_llm_rows_cost_three_bytes_each_in_a_block_header():
    """Equal symbol counts (as rows are cut) are stored as small differences from the first."""
    block = _llm_block([4000, 4001, 3999, 4002] * 16)
    block.rows = [Row(r.kind, bytes(300), r.token_count) for r in block.rows]
    assert len(block.header_bytes()) == 1 + 3 + 1 + 64 * 3 + 2 + 8


def test_index_locates_every_block_of_concatenated_streams_of_both_versions():
    golden = base64.b64decode(json.loads((GOLDEN / "tiny_model_mixer_v2.json").read_text())["archive_base64"])
    blocks = [_raw(b"abc"), _llm_block([7, 8])]
    one = _archive(blocks)
    data = golden + one + one
    streams = read_archive_index(io.BytesIO(data), "t")
    assert [s.version for s in streams] == [2, 3, 3]
    assert [s.start for s in streams] == [0, len(golden), len(golden) + len(one)]
    assert [s.stored_size for s in streams] == [len(golden), len(one), len(one)]
    base = streams[0].original_size
    entries = [b for s in streams[1:] for b in s.blocks]
    assert [b.original_offset - base for b in entries] == [0, 3, 63, 66]
    for entry, block in zip(entries, blocks * 2, strict=True):
        assert data[entry.offset : entry.offset + entry.stored_size] == block.to_bytes()
    assert streams[2].header == HEADER
    rows = block_rows(io.BytesIO(data), "t", streams[1])
    assert [[(r.kind, r.payload_size, r.token_count) for r in b] for b in rows] == [
        [(RowKind.RAW, 3, 0)],
        [(RowKind.LLM, 0, 7), (RowKind.LLM, 1, 8)],
    ]
    assert all(len(b) == 1 for b in block_rows(io.BytesIO(data), "t", streams[0]))


def test_a_version_2_archive_reads_front_to_back():
    golden = base64.b64decode(json.loads((GOLDEN / "tiny_model_mixer_v2.json").read_text())["archive_base64"])
    head, records = _read_all(golden, max_size=1024)
    assert head["model"]["name"] and "weights_sha256" in head["model"]
    assert all(len(b.rows) == 1 for b in records)
    assert sum(b.group_rows for b in records) == sum(len(b.llm_rows) for b in records)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d[:-1], "footer not found"),
        (lambda d: d + b"x", "footer not found"),
        (lambda d: d[:-10] + bytes([d[-10] ^ 4]) + d[-9:], "index size out of range|CRC"),
        (lambda d: d[:-14] + bytes([d[-14] ^ 4]) + d[-13:], "index: CRC"),
        (lambda d: d[5:], "more data than the file holds"),
    ],
)
def test_damaged_index_or_footer_is_refused(mutate, message):
    data = _archive([_raw(b"abc")] * 3)
    with pytest.raises(ArchiveError, match=message):
        read_archive_index(io.BytesIO(mutate(data)), "t")


def test_an_index_that_disagrees_with_the_blocks_is_refused_front_to_back():
    good = _raw(b"abc")
    head = stream_header_bytes(HEADER)
    entry = good.index_entry(len(good.to_bytes()))
    body = head + good.to_bytes() + good.to_bytes()
    with pytest.raises(ArchiveError, match="disagrees"):
        _read_all(body + index_and_footer_bytes(len(head), entry))
    with pytest.raises(ArchiveError, match="says header"):
        _read_all(body + index_and_footer_bytes(len(head) + 1, entry + entry))
    other = _raw(b"abd").index_entry(len(good.to_bytes()) + 1)
    with pytest.raises(ArchiveError, match="disagrees"):
        _read_all(body + index_and_footer_bytes(len(head), entry + other))
    _read_all(body + index_and_footer_bytes(len(head), entry + entry))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: b"", "empty input"),
        (lambda d: b"PK\x03\x04" + d[4:], "wrong magic"),
        (lambda d: d[:6] + b"\x01" + d[7:], "unsupported format version 1"),
        (lambda d: d[:7] + b"\x81" + d[8:], "reserved bits"),
        (lambda d: d[:12] + bytes([d[12] ^ 1]) + d[13:], "header: CRC"),
        (lambda d: d[:-1], "truncated"),
        (lambda d: d + b"junk", "trailing garbage"),
    ],
)
def test_damaged_archives_are_refused(mutate, message):
    data = _archive([_raw(b"abc")])
    with pytest.raises(ArchiveError, match=message):
        reader = ContainerReader(io.BytesIO(mutate(data)), "t")
        first = True
        while reader.read_stream_header(first) is not None:
            first = False
            while reader.read_block(64, 4) is not None:
                pass


@pytest.mark.parametrize(
    "block, message",
    [
        (Block([Row(RowKind.LLM, b"x", 61)], 60, 0, 1), "token counts"),
        (Block([Row(RowKind.LLM, b"x", 30), Row(RowKind.LLM, b"x", 31)], 60, 0, 2), "token counts"),
        (Block([Row(RowKind.ZSTD, b"x")], 10**9, 0), "number 1000000000 above 256"),
        (Block([Row(RowKind.ZSTD, b"x" * 11)], 10, 0), "payloads larger"),
        (Block([Row(RowKind.RAW, b"x", 0, 1)] * 5, 5, 0), "number 5 above 4"),
    ],
)
def test_claims_beyond_limits_are_refused_before_reading_payload(block, message):
    data = _archive([block])
    cut = len(stream_header_bytes(HEADER)) + len(block.header_bytes())  # no payload: it is never read
    with pytest.raises(ArchiveError, match=message):
        _read_all(data[:cut])


def test_a_stream_without_a_model_holds_no_llm_row():
    assert _read_all(_archive([_raw(b"abc")], {"model": None}))[0] == {"model": None}
    with pytest.raises(ArchiveError, match="without a model"):
        _read_all(_archive([_llm_block([3])], {"model": None}))


def test_every_truncation_and_bit_flip_is_detected():
    data = _archive([_raw(b"hello")])
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
            assert crc32(block.rows[0].payload) != block.checksum
