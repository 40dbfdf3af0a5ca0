import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from llmpipe.coder.frequencies import FREQ_BITS, code_positions, find_symbols, frequency_tables


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
