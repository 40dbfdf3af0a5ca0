"""The steering vector's priors: integer tables the same everywhere, and lossless coding within their range."""

import hashlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmpipe.errors import ArchiveError
from llmpipe.steering.hyperprior import (
    MAX_SCALE_UNITS,
    PRIOR_BITS,
    PRIORS,
    decode_values,
    encode_values,
    gaussian_frequencies,
    in_range,
    limit_of,
    prior_parameters,
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
def test_gaussian_values_round_trip(scale, data):
    limit = limit_of(scale)
    values = data.draw(st.lists(st.integers(-limit, limit), max_size=300))
    parameters = {"prior_scale": scale}
    assert decode_values(encode_values(values, "gaussian", parameters), len(values), "gaussian", parameters) == values


@settings(max_examples=40, deadline=None)
@given(prior=st.sampled_from(PRIORS), values=st.lists(st.integers(-3000, 3000), min_size=1, max_size=300))
def test_any_values_round_trip_with_the_parameters_each_prior_picks(prior, values):
    """Each prior's side information comes from the values; each clamps what its range cannot hold (the
    empirical prior only beyond +-2048)."""
    parameters = prior_parameters(prior, values)
    coded = in_range(prior, parameters, values)
    assert prior == "gaussian" or coded == [max(-2048, min(2047, v)) for v in values]
    assert decode_values(encode_values(coded, prior, parameters), len(coded), prior, parameters) == coded


def test_gaussian_values_cost_about_their_entropy():
    import random

    rng = random.Random(3)
    values = [max(-30, min(30, round(rng.gauss(0, 5)))) for _ in range(4000)]
    for prior in PRIORS:
        bits = 8 * len(encode_values(values, prior, prior_parameters(prior, values))) / len(values)
        assert 4.3 < bits < 4.5  # a discretised N(0, 25) carries 4.37 bits; the histogram adapts to it


def test_the_empirical_prior_learns_a_skewed_histogram():
    """Where the values are not Gaussian (here: mostly one value), the adaptive histogram costs far less."""
    values = [0] * 900 + [5, -7] * 50
    gaussian = 8 * len(encode_values(values, "gaussian", {"prior_scale": scale_for(values)}))
    empirical = 8 * len(encode_values(values, "empirical", prior_parameters("empirical", values)))
    assert empirical < 0.6 * gaussian


def test_out_of_range_values_and_scales_are_refused():
    with pytest.raises(ValueError):
        encode_values([limit_of(16) + 1], "gaussian", {"prior_scale": 16})
    with pytest.raises(ValueError):
        encode_values([3], "empirical", {"low": 0, "high": 2})
    for prior, parameters in [
        ("gaussian", {"prior_scale": MAX_SCALE_UNITS + 1}),
        ("gaussian", {}),
        ("empirical", {"low": 5, "high": 4}),
        ("empirical", {"low": 0, "high": 1 << 20}),
        ("empirical", {"low": -5000, "high": 0}),
        ("empirical", {"low": 0.5, "high": 4}),
        ("laplace", {}),
    ]:
        with pytest.raises(ArchiveError):
            decode_values(b"\x00", 3, prior, parameters)
