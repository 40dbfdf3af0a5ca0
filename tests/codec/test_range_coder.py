import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmpipe.codec.range_coder import MAX_TOTAL, RangeDecoder, RangeEncoder


@st.composite
def coded_sequences(draw):
    """Random frequency tables (sizes from 1 to huge) and one symbol drawn from each."""
    steps = []
    for _ in range(draw(st.integers(0, 200))):
        freqs = draw(st.lists(st.integers(1, 1 << 26), min_size=1, max_size=40))
        cumulative = [0]
        for f in freqs:
            cumulative.append(cumulative[-1] + f)
        steps.append((cumulative, draw(st.integers(0, len(freqs) - 1))))
    return steps


@settings(max_examples=200, deadline=None)
@given(coded_sequences())
def test_round_trip_and_size_close_to_ideal(steps):
    encoder = RangeEncoder()
    ideal = 0.0
    for cumulative, symbol in steps:
        size = cumulative[symbol + 1] - cumulative[symbol]
        encoder.encode(cumulative[symbol], size, cumulative[-1])
        ideal -= math.log2(size / cumulative[-1])
    data = encoder.finish()
    decoder = RangeDecoder(data)
    assert [decoder.decode_symbol(c) for c, _ in steps] == [s for _, s in steps]
    assert len(data) * 8 <= ideal + 3 * 8  # flush costs at most a few bytes


def test_exact_bytes_are_stable():
    """The coded bytes are part of the format: this must only change on purpose."""
    encoder = RangeEncoder()
    for start, size, total in [(0, 1, 2), (5, 3, 10), (1 << 20, 1, 1 << 28), (0, 99, 100)] * 3:
        encoder.encode(start, size, total)
    assert encoder.finish().hex() == "40266666fecb9f52ebf02571"


def test_certain_symbols_cost_nothing():
    encoder = RangeEncoder()
    for _ in range(1000):
        encoder.encode(0, MAX_TOTAL - 1, MAX_TOTAL)
    assert len(encoder.finish()) <= 2


def test_rejects_bad_intervals():
    encoder = RangeEncoder()
    with pytest.raises(ValueError):
        encoder.encode(3, 0, 10)
    with pytest.raises(ValueError):
        encoder.encode(8, 3, 10)
    with pytest.raises(ValueError):
        encoder.encode(0, 1, MAX_TOTAL + 1)
