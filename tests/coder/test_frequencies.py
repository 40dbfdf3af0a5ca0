import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from llmpipe.coder.frequencies import FREQ_BITS, frequency_tables


@settings(max_examples=100, deadline=None)
@given(
    hnp.arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(2, 300)), elements=st.floats(-80, 80, width=32)),
    st.integers(0, 256),
)
def test_every_symbol_codable_and_total_bounded(logits, extra):
    freq, probs = frequency_tables(logits, extra)
    assert freq.shape == (logits.shape[0], logits.shape[1] + extra)
    assert freq.min() >= 1
    assert (freq.sum(axis=1) <= 1 << FREQ_BITS).all()
    assert (freq[:, logits.shape[1] :] == 1).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)


def test_frequencies_follow_the_logits():
    logits = np.array([[0.0, 1.0, 2.0, -30.0]], dtype=np.float32)
    freq, _ = frequency_tables(logits, 0)
    assert freq[0, 3] < freq[0, 0] < freq[0, 1] < freq[0, 2]
    share = freq[0, 2] / freq.sum()
    assert abs(share - np.exp(2) / np.exp([0, 1, 2]).sum()) < 1e-6
