"""Quantising a learned prompt: every quantiser and prior round-trips through the header's JSON record."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from llmpipe.errors import ArchiveError
from llmpipe.steering.hyperprior import encode_values
from llmpipe.steering.quantise import (
    LLOYD_LEVELS,
    PRIORS,
    UNIFORM_DIVISORS,
    candidates,
    decode_coding,
    finest_step,
    lloyd_max,
    uniform,
)

RMS = 0.13
values_of = arrays(np.float32, st.tuples(st.integers(1, 3), st.integers(1, 40)), elements=st.floats(-2, 2, width=32))


@settings(max_examples=25, deadline=None)
@given(values=values_of)
def test_every_coding_decodes_from_its_json_record(values):
    """The decoder reads the record after JSON; it must rebuild the very float32 values the encoder used."""
    options = candidates(values, RMS)
    assert len(options) == len(UNIFORM_DIVISORS) * len(PRIORS) + len(LLOYD_LEVELS)
    for coded in options:
        record = json.loads(json.dumps(coded.coding))
        rebuilt = decode_coding(record, *values.shape)
        assert rebuilt.dtype == np.float32 and rebuilt.tobytes() == coded.values.tobytes()


@settings(max_examples=25, deadline=None)
@given(values=values_of, divisor=st.sampled_from(UNIFORM_DIVISORS), prior=st.sampled_from(PRIORS))
def test_uniform_values_are_the_nearest_grid_points(values, divisor, prior):
    coded = uniform(values, finest_step(RMS) * 8 / divisor, prior)
    step = coded.coding["step"]
    error = np.abs(coded.values - values)
    clamped = np.abs(coded.values) >= np.abs(values)  # the Gaussian prior's range may clamp outliers inward
    assert np.all((error <= step / 2 + 1e-7) | ~clamped)


def test_lloyd_max_places_levels_where_the_values_are():
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(-1, 0.05, 300), rng.normal(1, 0.05, 300)]).astype(np.float32)[None]
    coded = lloyd_max(values, 4, 2.0**-10)
    levels = np.array(coded.coding["levels"]) * 2.0**-10
    assert len(levels) == 4 and np.all(np.abs(np.abs(levels) - 1) < 0.15)
    assert set(np.unique(coded.values).tolist()) <= set(levels.astype(np.float32).tolist())
    assert float(np.mean((coded.values - values) ** 2)) < 0.01


def test_more_levels_cost_more_bits_and_less_error():
    rng = np.random.default_rng(2)
    values = rng.normal(0, RMS, (2, 200)).astype(np.float32)
    coarse, fine = (uniform(values, finest_step(RMS) * 8 / d, "gaussian") for d in (1, 8))
    assert coarse.bits < fine.bits
    assert np.mean((coarse.values - values) ** 2) > np.mean((fine.values - values) ** 2)


def test_a_record_without_a_quantiser_is_the_uniform_gaussian_of_llmpipe_0_3():
    data = encode_values([1, -2, 0], "gaussian", {"prior_scale": 16})
    import base64

    record = {"step": 0.25, "prior": "gaussian", "prior_scale": 16, "data": base64.b64encode(data).decode()}
    assert decode_coding(record, 1, 3).tolist() == [[0.25, -0.5, 0.0]]


LLOYD = {"quantiser": "lloyd", "step": 0.25, "prior": "empirical", "levels": [-1, 1], "low": 0, "high": 1, "data": ""}


@pytest.mark.parametrize(
    "record",
    [
        {},
        {"quantiser": "kmeans", "step": 0.25, "prior": "empirical", "low": 0, "high": 1, "data": ""},
        {**LLOYD, "levels": []},
        {**LLOYD, "levels": [0.5, 1]},
        {**LLOYD, "high": 2},
        {**LLOYD, "prior": "gaussian", "prior_scale": 16},
        {**LLOYD, "levels": [0, 1 << 30]},
        {"quantiser": "uniform", "step": 0.25, "prior": "empirical", "low": 1 << 30, "high": 1 << 30, "data": ""},
    ],
)
def test_damaged_codings_are_refused(record):
    with pytest.raises(ArchiveError):
        decode_coding(record, 1, 4)
