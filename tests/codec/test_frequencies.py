import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from llmpipe.codec.frequencies import (
    FREQ_BITS,
    code_positions,
    find_symbols,
    frequency_tables,
    frequency_tables_torch,
    kernels_for,
)


@settings(max_examples=100, deadline=None)
@given(
    hnp.arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(2, 300)), elements=st.floats(-80, 80, width=32)),
    st.integers(0, 256),
)
def test_every_symbol_codable_and_total_bounded(logits, extra):
    freq = frequency_tables(torch.from_numpy(logits), extra).numpy()
    assert (freq == np.floor(freq)).all()
    assert freq.shape == (logits.shape[0], logits.shape[1] + extra)
    assert freq.min() >= 1
    assert (freq.sum(axis=1) <= 1 << FREQ_BITS).all()
    assert (freq.sum(axis=1) > (1 << FREQ_BITS) - logits.shape[1] - extra - logits.shape[1]).all()  # little waste
    assert (freq[:, logits.shape[1] :] == 1).all()


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.integers(1, 9),
    st.integers(2, 3000),
    st.sampled_from([0.01, 1.0, 30.0, 1e4]),
    st.integers(0, 256),
)
def test_the_compiled_tables_are_torchs(seed, rows, vocab, spread, extra):
    """The compiled kernel (where this machine has one) against the torch operations: halves of the
    1/256 grid, logits far below the maximum (clamped to the table's 0), ties for the maximum."""
    if kernels_for(torch.device("cpu")) is None:
        pytest.skip("no compiled kernels here (no C compiler): only the torch path runs")
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * spread
    logits[0, : vocab // 2] = (torch.arange(vocab // 2) + 0.5) / 256  # exact halves of the grid
    logits[-1, -1] = logits[-1].max()
    assert torch.equal(frequency_tables(logits, extra), frequency_tables_torch(logits, extra))


def test_frequencies_follow_the_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0, -30.0, 1.37]])
    freq = frequency_tables(logits, 0)[0].numpy()
    assert freq[3] < freq[0] < freq[1] < freq[4] < freq[2]
    softmax = torch.softmax(logits.double(), dim=1)[0].numpy()
    share = freq / freq.sum()
    np.testing.assert_allclose(share[[0, 1, 2, 4]], softmax[[0, 1, 2, 4]], rtol=3e-3)  # 1/256-nat grid


def test_tables_depend_only_on_the_row():
    """A row's table is the same alone and in a batch: the integer softmax has no cross-row state."""
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 1000, generator=generator) * 4
    together = frequency_tables(logits, 256).numpy()
    for r in range(5):
        np.testing.assert_array_equal(frequency_tables(logits[r : r + 1], 256)[0].numpy(), together[r])


def test_code_positions_and_find_symbols_agree():
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(2)) * 3
    freq = frequency_tables(logits, 256)
    symbols = torch.tensor([0, 5, 299, 300, 555, 17])  # ordinary tokens and escapes (>= 300)
    starts, sizes, totals = code_positions(freq, symbols)
    cumulative = np.cumsum(freq.numpy(), axis=1)
    for r, s in enumerate(symbols.tolist()):
        assert (starts[r], sizes[r], totals[r]) == (cumulative[r, s] - freq[r, s], freq[r, s], cumulative[r, -1])
    for offset in (0, 1):  # the first and the last count inside each symbol's range
        targets = [st + (sz - 1) * offset for st, sz in zip(starts, sizes, strict=True)]
        found, found_starts, found_sizes = find_symbols(freq, lambda totals, t=targets: t)
        assert found == symbols.tolist() and found_starts == starts and found_sizes == sizes
