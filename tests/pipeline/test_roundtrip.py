"""Round trips through the compressor and decompressor with the tiny model."""

import io
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmpipe.codec.context import ContextWindow
from llmpipe.errors import ArchiveError, ChecksumError, ModelMismatchError
from llmpipe.format.block import Block, RowKind
from llmpipe.pipeline import blocks
from llmpipe.pipeline.blocks import split_rows, utf8_safe_split
from llmpipe.pipeline.compress import Compressor
from llmpipe.pipeline.decompress import Decompressor
from llmpipe.pipeline.stats import Stats
from tests.bad_archives import split_header, split_index
from tests.conftest import ARCHITECTURES
from tests.tiny_model import DATA

TEXT = (DATA / "alice_chapter1.txt").read_bytes()
CHUNK = 256


@pytest.fixture(scope="module")
def compressor(tiny_model):
    return Compressor(tiny_model, chunk_size=CHUNK, batch=4, threads=1)


@pytest.fixture(scope="module")
def decompressor(tiny_model):
    return Decompressor(tiny_model)


CASES = {
    "empty": b"",
    "one byte": b"a",
    "chunk-1": TEXT[: CHUNK - 1],
    "chunk": TEXT[:CHUNK],
    "chunk+1": TEXT[: CHUNK + 1],
    "random bytes": random.Random(7).randbytes(700),
    "invalid utf8": b"ok \xff\xfe\xc3 \xed\xa0\x80 end" * 20,
    "crlf": TEXT[:600].replace(b"\n", b"\r\n"),
    "nul": b"\x00" * 300 + b"text\x00more",
    "special tokens": b"<|endoftext|><|im_start|>system\nhi<|im_end|>" * 8,
    "multibyte across chunk edges": "é€😀".encode() * 200,
}


@pytest.mark.parametrize("name", CASES)
def test_round_trip(compressor, decompressor, name):
    data = CASES[name]
    archive = compressor.compress(data)
    assert decompressor.decompress(archive) == data


def test_text_is_coded_by_the_model_near_its_ideal_length(compressor, decompressor):
    sink = io.BytesIO()
    stats = compressor.compress_stream(io.BytesIO(TEXT), sink)
    assert decompressor.decompress(sink.getvalue()) == TEXT
    assert stats.rows["llm"] > stats.rows["zstd"] + stats.rows["raw"]
    assert 0 <= stats.coder_overhead < 0.02  # tiny chunks; the bench measures the real overhead


def test_a_few_hundred_kilobytes(tiny_model):
    data = (TEXT * 25)[:300_000]
    compressor = Compressor(tiny_model, chunk_size=4096, batch=64, threads=2)
    assert Decompressor(tiny_model).decompress(compressor.compress(data)) == data


def test_concatenated_archives_decode_to_concatenation(compressor, decompressor):
    archive = compressor.compress(b"first part\n") + compressor.compress(TEXT[:500])
    assert decompressor.decompress(archive) == b"first part\n" + TEXT[:500]


def test_damaged_llm_payload_is_a_checksum_error(compressor, decompressor):
    archive = bytearray(compressor.compress(TEXT[:CHUNK]))
    archive[len(split_index(bytes(archive))[0]) - 3] ^= 0x10  # inside the last block's payload
    with pytest.raises(ChecksumError, match=r"block 1 \(bytes 0-255\): checksum mismatch"):
        decompressor.decompress(bytes(archive))


def test_other_model_is_refused(tiny_model, tiny_model_dir, tmp_path, compressor):
    from llmpipe.models import cache
    from tests.tiny_model import build_tiny_model

    other = cache.load(str(build_tiny_model(tmp_path / "other", train_steps=1, seed=1)))
    archive = compressor.compress(TEXT[:1000])
    with pytest.raises(ModelMismatchError, match="archive was made with model"):
        Decompressor(other).decompress(archive)


def test_utf8_safe_split():
    assert utf8_safe_split(b"abc") == 3
    assert utf8_safe_split("aé".encode()[:-1]) == 1
    assert utf8_safe_split("a€".encode()[:-1]) == 1
    assert utf8_safe_split("a€".encode()) == 4
    assert utf8_safe_split(b"\xff\xff") == 2


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.binary(max_size=600) | st.text(max_size=300).map(str.encode),
    chunk_size=st.integers(16, 300),
    batch=st.integers(1, 5),
)
def test_property_round_trip(tiny_model, data, chunk_size, batch):
    archive = Compressor(tiny_model, chunk_size=chunk_size, batch=batch, threads=1).compress(data)
    assert Decompressor(tiny_model).decompress(archive) == data


def test_rows_have_equal_symbol_counts_and_start_on_characters():
    spellings = [bytes([b]) for b in range(256)] + ["é".encode()[:1], "é".encode()[1:]]
    symbols = [97] + [256, 257] * 50  # cuts at 20, 40, ... land on continuation bytes
    rows = split_rows(symbols, spellings, 5)
    assert [s for row in rows for s in row] == symbols
    lengths = [len(r) for r in rows]
    assert max(lengths) - min(lengths) <= 3
    assert all(not 0x80 <= spellings[row[0]][0] <= 0xBF for row in rows)
    assert split_rows([1, 2], spellings, 10) == [[1], [2]]
    assert split_rows([], spellings, 3) == [[]]


def test_float_numerics_round_trip(tiny_model):
    float_compressor = Compressor(tiny_model, chunk_size=CHUNK, batch=3, threads=1, numerics="float")
    data = TEXT[:1500] + b"\xff\x00 tail"
    archive = float_compressor.compress(data)
    assert Decompressor(tiny_model).decompress(archive) == data


@pytest.mark.parametrize("numerics", ["exact", "float"])
@pytest.mark.parametrize("arch", ["gpt_neox", "gpt2"])
def test_other_architectures_round_trip(tiny_models, arch, numerics):
    """GPT-NeoX (Pythia) and GPT-2 models code text with the model, through both engines, at other batches."""
    model = tiny_models[arch]
    data = TEXT[:3000] + b"\xff\x00 tail"
    compressor = Compressor(model, chunk_size=1024, batch=3, threads=1, numerics=numerics, context=96, overlap=32)
    sink = io.BytesIO()
    stats = compressor.compress_stream(io.BytesIO(data), sink)
    assert stats.llm_input_bytes > 2000  # the model won: the text is LLM-coded
    assert Decompressor(model).decompress(sink.getvalue()) == data
    header, _ = split_header(sink.getvalue())
    assert header["model"]["arch"] == arch


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("dtype, load_in_8bit", [("float16", False), ("bfloat16", False), ("float32", True)])
def test_float_dtypes_and_8bit_weights_round_trip(tiny_models, arch, dtype, load_in_8bit):
    """The float engine at each --dtype and with --load-in-8bit: the header records the choice and the
    decoder, reading it, rebuilds the same network (here with a different decoder batch, which float
    archives ignore)."""
    model = tiny_models[arch]
    data = TEXT[:2000] + b"\xff\x00 tail"
    compressor = Compressor(
        model, chunk_size=700, batch=3, threads=1, numerics="float", dtype=dtype, load_in_8bit=load_in_8bit
    )
    sink = io.BytesIO()
    stats = compressor.compress_stream(io.BytesIO(data), sink)
    assert stats.llm_input_bytes > 1400
    numerics = split_header(sink.getvalue())[0]["numerics"]
    assert numerics["dtype"] == dtype
    assert numerics.get("load_in_8bit", False) == load_in_8bit
    assert ("bitsandbytes" in numerics) == load_in_8bit
    assert Decompressor(model, batch=1).decompress(sink.getvalue()) == data


def test_exact_numerics_refuse_float_weight_options(tiny_model):
    from llmpipe.errors import UsageError

    for options in ({"dtype": "float16"}, {"load_in_8bit": True}):
        with pytest.raises(UsageError, match="--dtype and --load-in-8bit choose the float engine"):
            Compressor(tiny_model, numerics="exact", **options)


@pytest.mark.parametrize("mixer_version", [0, 1, 2])
@pytest.mark.parametrize("context", [ContextWindow(), ContextWindow(40, 13)])
def test_exact_payloads_are_independent_of_batch_and_threads(tiny_model, context, mixer_version):
    """A chunk's exact code does not depend on what it is batched with, nor on the thread count."""
    from llmpipe.codec.coder import LlmCoder
    from llmpipe.engine.exact_engine import ExactEngine

    tokenizer = tiny_model.tokenizer
    rows = [tokenizer.encode(TEXT[a : a + 300]) for a in (0, 300, 900)]
    together = (
        LlmCoder(ExactEngine(tiny_model, threads=2), tokenizer).encode_group(rows, context, mixer_version).payloads
    )
    alone = (
        LlmCoder(ExactEngine(tiny_model, threads=1), tokenizer).encode_group(rows[1:2], context, mixer_version).payloads
    )
    assert alone[0] == together[1]
    decoded = LlmCoder(ExactEngine(tiny_model, threads=1), tokenizer).decode_group(
        together[::-1], [len(r) for r in rows[::-1]], context, mixer_version
    )
    assert decoded == rows[::-1]  # decoded in another order and batch than encoded


@pytest.mark.parametrize("numerics", ["exact", "float"])
@pytest.mark.parametrize("context, overlap", [(3, 1), (32, 8), (64, 62)])
def test_sliding_context_window_round_trip(tiny_model, numerics, context, overlap):
    """Chunks far longer than the window restart it many times; the decoder follows (also at another batch)."""
    data = TEXT[:2000]
    compressor = Compressor(
        tiny_model, chunk_size=700, batch=3, threads=1, numerics=numerics, context=context, overlap=overlap
    )
    archive = compressor.compress(data)
    assert split_header(archive)[0]["context"] == {"window": context, "overlap": overlap}
    assert Decompressor(tiny_model, batch=1).decompress(archive) == data
    assert Decompressor(tiny_model, batch=5).decompress(archive) == data


def test_context_window_matches_its_definition(tiny_model):
    """Encoder tables equal the model run on each symbol's context as FORMAT.md defines it, from scratch."""
    from llmpipe.codec.coder import LlmCoder
    from llmpipe.codec.frequencies import frequency_tables
    from llmpipe.engine.exact_engine import ExactEngine
    from llmpipe.tokenization import ESCAPE_SYMBOLS

    tokenizer = tiny_model.tokenizer
    engine = ExactEngine(tiny_model, threads=1)
    symbols = tokenizer.encode(TEXT[:200])[:30]
    context = ContextWindow(10, 4)
    x = [tokenizer.prime_token] + [tokenizer.model_input(s) for s in symbols[:-1]]
    starts = context.starts(len(x))
    assert starts == [0, 10, 16, 22, 28]
    coded = LlmCoder(engine, tokenizer).encode_group([symbols], context, mixer_version=0)
    ideal = 0.0
    for i, symbol in enumerate(symbols):
        k = max(j for j, a in enumerate(starts) if a <= i)
        seen = x[: i + 1] if k == 0 else [x[0]] + x[starts[k] - 3 : i + 1]
        assert len(seen) <= 10
        _, _, logits = list(engine.scores([seen], [len(seen) - 1]))[0]
        freq = frequency_tables(logits, ESCAPE_SYMBOLS)
        ideal += float(np.log2(freq[0].sum().item() / freq[0, symbol].item()))
    assert coded.ideal_bits[0] == pytest.approx(ideal, rel=1e-12)


def test_unknown_exact_numerics_version_is_refused(compressor, tiny_model):
    from tests.bad_archives import split_header, with_header

    archive = compressor.compress(TEXT[:700])
    header, _ = split_header(archive)
    header["numerics"]["version"] = 99
    with pytest.raises(ArchiveError, match="exact numerics version 99"):
        Decompressor(tiny_model).decompress(with_header(archive, header))


def test_float_fingerprint_mismatch_is_refused_unless_forced(tiny_model):
    from tests.bad_archives import split_header, with_header

    compressor = Compressor(tiny_model, chunk_size=CHUNK, batch=4, threads=1, numerics="float")
    archive = compressor.compress(TEXT[:700])
    header, _ = split_header(archive)
    header["numerics"]["torch"] = "0.0.1"
    header["numerics"]["cpu_capability"] = "NEON"
    changed = with_header(archive, header)
    with pytest.raises(ModelMismatchError, match=r"cpu_capability 'NEON' here '.*', torch '0.0.1'"):
        Decompressor(tiny_model).decompress(changed)
    assert Decompressor(tiny_model, force=True).decompress(changed) == TEXT[:700]


def test_exact_groups_are_merged_up_to_the_decoder_batch(tiny_model):
    """An archive of one-row groups decodes in batches of several groups (and in single groups)."""
    data = TEXT[:2500]
    archive = Compressor(tiny_model, chunk_size=CHUNK, batch=1, threads=1).compress(data)
    assert Decompressor(tiny_model, batch=8).decompress(archive) == data
    assert Decompressor(tiny_model, batch=1).decompress(archive) == data


def test_decoder_holds_a_bounded_number_of_blocks(tiny_model, monkeypatch):
    """Plain blocks after a lone LLM row are written as they come, not held for a batch that never fills."""
    data = TEXT[:256] + random.Random(3).randbytes(256 * 40)  # one text row, then 40 rows zstd/raw cannot beat
    archive = Compressor(tiny_model, chunk_size=CHUNK, batch=1, threads=1).compress(data)
    held: list[int] = []
    original = Decompressor._start

    def counting(self, pending, *args):
        held.append(len(pending))
        return original(self, pending, *args)

    monkeypatch.setattr(Decompressor, "_start", counting)
    assert Decompressor(tiny_model, batch=8).decompress(archive) == data
    assert len(held) > 5 and max(held) <= 2 * 8 + 1


def test_a_batch_too_large_for_the_memory_is_refused_up_front(tiny_model):
    from llmpipe.errors import UsageError

    with pytest.raises(UsageError, match=r"with --batch 64: NO, .* over the 0.06 GiB limit on cpu \(--batch \d+ fits"):
        Compressor(tiny_model, chunk_size=2048, batch=64, memory=64 << 20)
    assert Compressor(tiny_model, chunk_size=2048, memory=64 << 20).batch < 64  # the default batch fits instead


def test_a_group_over_the_engines_kv_limit_is_refused(tiny_model):
    """The engines' own check (hostile archives): a group whose cache exceeds what the device has left."""
    from llmpipe.engine.exact_engine import ExactEngine
    from llmpipe.errors import LlmpipeError

    engine = ExactEngine(tiny_model, threads=1)
    engine.kv_limit = 1 << 20
    with pytest.raises(LlmpipeError, match=r"64 rows x 2000 positions need .* GiB of KV cache, over the"):
        engine.session(64, 2000)


def test_exact_decoder_splits_groups_to_fit_the_memory_it_has(tiny_model, monkeypatch):
    """Exact rows decode in parts when the device has room for fewer rows' KV cache than the archive's group."""
    from llmpipe.engine import exact_engine

    data = TEXT[:6000]
    archive = Compressor(tiny_model, chunk_size=CHUNK * 4, batch=6, threads=1).compress(data)
    per_position = exact_engine.ExactKVCache.bytes_per_position(tiny_model.config)
    limit = 2 * (CHUNK * 4 + 1) * per_position  # two rows of the longest possible block
    monkeypatch.setattr(exact_engine, "available_memory", lambda device: limit)
    sessions: list[tuple[int, int]] = []
    original = exact_engine.ExactEngine.session

    def recording(self, rows, positions):
        sessions.append((rows, positions))
        return original(self, rows, positions)

    monkeypatch.setattr(exact_engine.ExactEngine, "session", recording)
    assert Decompressor(tiny_model, batch=6).decompress(archive) == data
    assert len(sessions) >= 2 and sum(rows for rows, _ in sessions) == 6
    assert all(rows * positions * per_position <= limit for rows, positions in sessions)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_window_never_costs_more_than_storing_it_plain(tiny_model, seed):
    """Mixed input (random bytes around text): the blocks together never outweigh one zstd/raw block."""
    noise = random.Random(seed).randbytes(300)
    data = noise + TEXT[:400] + noise  # zstd sees the repeat only if the noise stays in one block
    compressor = Compressor(tiny_model, chunk_size=CHUNK, batch=8, threads=1)
    archive = compressor.compress(data)
    assert Decompressor(tiny_model).decompress(archive) == data
    before_index, header_size = split_index(archive)[0], split_index(archive)[1]
    plain = Block([compressor.windows.plain_row(data)], len(data), 0).to_bytes()
    assert len(before_index) - header_size <= len(plain)



@pytest.mark.parametrize("max_cost, rows", [(1.0, 2), (-0.5, 1)])
def test_a_one_row_window_is_two_rows_when_they_cost_little(tiny_model, monkeypatch, max_cost, rows):
    """TWO_ROWS_FROM: a window that would be one row is also coded as two, kept when at most
    TWO_ROWS_MAX_COST larger; either way it decodes, and the statistics count the kept block's rows only."""
    monkeypatch.setattr(blocks, "TWO_ROWS_MAX_COST", max_cost)
    compressor = Compressor(tiny_model, chunk_size=4096, batch=4, threads=1)
    compressor.windows.two_rows_from = 1000
    data = TEXT[:1500]
    stats = Stats()
    block = compressor.code_window(data, stats)
    assert [row.kind for row in block.rows] == [RowKind.LLM] * rows
    assert stats.llm_input_bytes == len(data)
    assert stats.llm_payload_bytes == sum(len(row.payload) for row in block.rows)
    assert Decompressor(tiny_model).decompress(compressor.compress(data)) == data
