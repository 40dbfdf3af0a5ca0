"""The history mixer (``llmpipe.codec.mixer``): table bounds, learning, exactness, header field."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmpipe.codec import mixer
from llmpipe.codec.frequencies import FREQ_BITS, code_positions
from llmpipe.codec.mixer import RowHistory, learn_step, lm_sizes, mix_tables, predict_step
from llmpipe.codec.range_coder import MAX_TOTAL
from llmpipe.errors import ArchiveError, LlmpipeError, UsageError
from llmpipe.pipeline.compress import Compressor
from llmpipe.pipeline.decompress import Decompressor
from tests.bad_archives import split_header, with_header
from tests.tiny_model import DATA

SYMBOLS = 64


def lm_tables(count: int, seed: int) -> torch.Tensor:
    """Random LM-like tables: integers >= 1 summing to at most 2^28, some very peaked."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, rng.uniform(0.5, 6.0, size=(count, 1)), size=(count, SYMBOLS))
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return torch.from_numpy(1.0 + np.floor(p * ((1 << FREQ_BITS) - SYMBOLS)))


def mixed_run(history: RowHistory, freq: torch.Tensor, symbols: list[int]) -> torch.Tensor:
    """The encoder's mixed tables of a run of known symbols (``RowHistory.predict_run``), built: ``freq``
    (the LM tables) mixed in place and returned."""
    predictions = history.predict_run(symbols, freq.sum(dim=1).tolist(), lm_sizes(freq, symbols))
    return mix_tables(freq, predictions)


def code_length(freq: torch.Tensor, symbols: list[int]) -> float:
    picked = freq.gather(1, torch.tensor(symbols)[:, None])[:, 0]
    return float(torch.log2(freq.sum(dim=1) / picked).sum())


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 7), min_size=1, max_size=300), st.integers(0, 2**32 - 1))
def test_mixed_tables_keep_every_symbol_codable_and_within_the_coder_total(symbols, seed):
    history = RowHistory()
    tables = lm_tables(len(symbols), seed)
    mixed = mixed_run(history, tables.clone(), symbols)
    assert mixed.min() >= 1
    assert mixed.sum(dim=1).max() <= MAX_TOTAL
    assert torch.equal(mixed, torch.floor(mixed))  # integers: exact cumulative sums in float64
    unseen = [s for s in range(SYMBOLS) if s not in symbols]
    assert torch.all(mixed[:, unseen] <= tables[:, unseen] * 1.001)  # experts add mass only to symbols seen before


def test_repeats_cost_little_once_learned():
    """A phrase the LM knows nothing about (uniform tables) costs a fraction of its size after a few repeats."""
    rng = np.random.default_rng(7)
    phrase = rng.integers(0, SYMBOLS, size=40).tolist()
    symbols = phrase * 8
    uniform = torch.full((len(symbols), SYMBOLS), float(1 << (FREQ_BITS - 6)), dtype=torch.float64)
    mixed = mixed_run(RowHistory(), uniform, symbols)
    last = slice(len(phrase) * 7, len(phrase) * 8)
    plain_bits = len(phrase) * math.log2(SYMBOLS)
    assert code_length(mixed[last], symbols[last]) < 0.1 * plain_bits
    assert code_length(mixed[: len(phrase)], phrase) < 1.01 * plain_bits  # nothing to learn from yet: no harm


def test_lockstep_and_whole_run_give_identical_tables():
    """The decoder's order (all rows predict, then all learn) gives the encoder's tables bit for bit."""
    rows = [np.random.default_rng(r).integers(0, 12, size=150).tolist() for r in range(3)]
    tables = [lm_tables(150, 100 + r) for r in range(3)]
    whole = [mixed_run(RowHistory(), t.clone(), s) for t, s in zip(tables, rows, strict=True)]  # mixes in place
    histories = [RowHistory() for _ in rows]
    for step in range(150):
        table = torch.stack([t[step] for t in tables])
        predictions = predict_step(table.sum(dim=1).tolist(), histories)
        symbols = [s[step] for s in rows]
        sizes = lm_sizes(table, symbols)  # as the decoder does: the LM frequencies before mixing in place
        mixed = mix_tables(table, predictions)
        learn_step(histories, predictions, symbols, sizes)
        for r in range(3):
            assert torch.equal(mixed[r], whole[r][step])


@pytest.mark.parametrize("compiled", [True, False])
def test_the_decoder_finds_the_encoders_symbols(compiled, monkeypatch):
    """``row_totals`` and ``decode_symbols`` (the decoder's two passes, compiled or in torch) on live rows of
    a lockstep position give the totals, symbols, starts and sizes of the mixed tables the encoder codes
    with, for targets at both ends of each symbol's interval; and the LM frequencies the update needs."""
    if compiled and mixer.kernels_for(torch.device("cpu")) is None:
        pytest.skip("no compiled kernels here (no C compiler)")
    if not compiled:
        monkeypatch.setattr(mixer, "kernels_for", lambda device: None)
    rows = [np.random.default_rng(r).integers(0, 12, size=120).tolist() for r in range(4)]
    tables = [lm_tables(120, 200 + r) for r in range(4)]
    histories = [RowHistory() for _ in rows]
    live = [0, 2, 3]  # row 1 has ended: the tables keep its row
    for step in range(120):
        freq = torch.stack([t[step] for t in tables])
        totals = mixer.row_totals(freq, live)
        assert totals == freq[live].sum(dim=1).tolist()
        predictions = predict_step(totals, [histories[r] for r in live])
        symbols = [rows[r][step] for r in live]
        for mixture in (predictions, None):  # the mixed tables, and the LM tables as they are (no mixer)
            table = freq[live] if mixture is None else mix_tables(freq[live], mixture)
            starts, sizes, table_totals = code_positions(table, torch.tensor(symbols))
            for end in (0, 1):  # the first and the last count of each interval
                targets = [start + end * (size - 1) for start, size in zip(starts, sizes, strict=True)]
                seen = []

                def targets_for(totals: list[int], targets: list[int] = targets, seen: list = seen) -> list[int]:
                    seen.extend(totals)
                    return targets

                found = mixer.decode_symbols(freq, live, mixture, targets_for)
                assert found == (symbols, starts, sizes, freq[live, symbols].tolist())
                assert seen == table_totals
        learn_step([histories[r] for r in live], predictions, symbols, freq[live, symbols].tolist())


def test_mixed_tables_are_pinned():
    """Any change to the mixer's arithmetic changes archives: this digest changes only on purpose
    (then bump ``mixer.VERSION`` and FORMAT.md section 5)."""
    rng = np.random.default_rng(2026)
    symbols = (rng.integers(0, 10, size=200).tolist() + rng.integers(0, 40, size=30).tolist()) * 3
    mixed = mixed_run(RowHistory(), lm_tables(len(symbols), 1), symbols)
    digest = hashlib.sha256(mixed.numpy().astype("<f8").tobytes()).hexdigest()
    assert digest == "e0ab3c01f930ef45612101e17c75dc493effdd9d7e8ce5752ded4c45f7271251"


def test_header_records_the_mixer_and_none_round_trips(tiny_model):
    data = (DATA / "alice_chapter1.txt").read_bytes()[:1500]
    on = Compressor(tiny_model, chunk_size=500, batch=3, threads=1).compress(data)
    off = Compressor(tiny_model, chunk_size=500, batch=3, threads=1, mixing=False).compress(data)
    assert split_header(on)[0]["mixer"] == {"name": "ngram-match", "version": 2}
    assert split_header(off)[0]["mixer"] is None
    assert Decompressor(tiny_model).decompress(on) == data
    assert Decompressor(tiny_model).decompress(off) == data


def test_unknown_mixer_is_refused_before_decoding(tiny_model):
    data = (DATA / "alice_chapter1.txt").read_bytes()[:800]
    archive = Compressor(tiny_model, chunk_size=400, batch=2, threads=1).compress(data)
    header, _ = split_header(archive)
    header["mixer"] = {"name": "ngram-match", "version": 3}
    with pytest.raises(ArchiveError, match="mixer"):
        Decompressor(tiny_model).decompress(with_header(archive, header))


def test_record_round_trips():
    assert mixer.check_record(mixer.record(mixer.VERSION)) == mixer.VERSION == 2
    assert mixer.check_record(mixer.record(1)) == 1  # archives from before the adaptive bias
    assert mixer.check_record(mixer.record(0)) == 0
    assert mixer.check_record(None) == 0


def test_windows_whose_histories_cannot_fit_are_refused_up_front(tiny_model):
    with pytest.raises(UsageError, match="--mixer none"):
        Compressor(tiny_model, chunk_size=8 << 20, batch=2, threads=1)
    Compressor(tiny_model, chunk_size=8 << 20, batch=2, threads=1, mixing=False)  # no history: no limit


def test_the_decoder_splits_merged_rows_to_bound_history_memory(tiny_model, monkeypatch):
    """Rows merged by the decoder beyond the history limit are decoded in parts; one row beyond it is refused."""
    import llmpipe.codec.coder
    import llmpipe.codec.memory

    data = (DATA / "alice_chapter1.txt").read_bytes()[:2400]
    archive = Compressor(tiny_model, chunk_size=400, batch=6, threads=1).compress(data)
    decoded_parts = []
    original = llmpipe.codec.coder.LlmCoder.decode_group

    def spy(self, payloads, counts, context, mixing):
        decoded_parts.append(len(payloads))
        return original(self, payloads, counts, context, mixing)

    monkeypatch.setattr(llmpipe.codec.coder.LlmCoder, "decode_group", spy)
    longest = max(len(tiny_model.tokenizer.encode(data[a : a + 400])) for a in range(0, 2400, 400))
    for module in (llmpipe.codec.coder, llmpipe.codec.memory):
        monkeypatch.setattr(module, "HISTORY_SYMBOLS", 2 * longest)
    assert Decompressor(tiny_model, batch=6).decompress(archive) == data
    assert decoded_parts[0] == 6 and all(n <= 2 for n in decoded_parts[1:]) and len(decoded_parts) > 3
    for module in (llmpipe.codec.coder, llmpipe.codec.memory):
        monkeypatch.setattr(module, "HISTORY_SYMBOLS", 10)
    with pytest.raises(LlmpipeError, match="mixer's history"):
        Decompressor(tiny_model, batch=6).decompress(archive)
