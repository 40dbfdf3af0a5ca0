"""The steering vector's prior: integer tables the same everywhere, and lossless coding within its range."""

import hashlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmpipe.errors import ArchiveError
from llmpipe.steering.hyperprior import (
    MAX_SCALE_UNITS,
    PRIOR_BITS,
    decode_values,
    encode_values,
    gaussian_frequencies,
    limit_of,
    scale_for,
)


def test_table_is_pinned():
    """Built by decimal arithmetic: a decoder anywhere builds these very integers (scale 5 steps)."""
    table = gaussian_frequencies(80)
    assert hashlib.sha256(json.dumps(table).encode()).hexdigest() == (
        "f5622d95880dfd30b56cfeb3323466ed522620fc8f1262231e0d830ef686ec01"
    )
    assert len(table) == 2 * limit_of(80) + 1 == 61 and table == table[::-1]


@pytest.mark.parametrize("scale", [1, 7, 16, 80, 400, MAX_SCALE_UNITS])
def test_tables_fit_the_coder(scale):
    table = gaussian_frequencies(scale)
    assert min(table) >= 1 and sum(table) <= 1 << PRIOR_BITS


@settings(max_examples=40, deadline=None)
@given(scale=st.integers(1, 400), data=st.data())
def test_values_round_trip(scale, data):
    limit = limit_of(scale)
    values = data.draw(st.lists(st.integers(-limit, limit), max_size=300))
    assert decode_values(encode_values(values, scale), len(values), scale) == values


def test_gaussian_values_cost_about_their_entropy():
    import random

    rng = random.Random(3)
    values = [max(-30, min(30, round(rng.gauss(0, 5)))) for _ in range(4000)]
    bits = 8 * len(encode_values(values, scale_for(values))) / len(values)
    assert 4.3 < bits < 4.5  # a discretised N(0, 25) carries 4.37 bits


def test_out_of_range_values_and_scales_are_refused():
    with pytest.raises(ValueError):
        encode_values([limit_of(16) + 1], 16)
    with pytest.raises(ArchiveError):
        decode_values(b"\x00", 3, MAX_SCALE_UNITS + 1)
