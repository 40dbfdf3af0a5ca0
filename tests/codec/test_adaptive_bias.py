"""The adaptive bias (``llmpipe.codec.adaptive_bias``): table bounds, learning, exactness, kernels vs torch."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmpipe.codec.adaptive_bias import LIMIT, RATE, AdaptiveBias, multipliers
from llmpipe.codec.frequencies import FREQ_BITS
from tests.codec.test_kernels import built, kernels  # noqa: F401 (fixtures)
from tests.codec.test_mixer import lm_tables
from tests.kernel_builds import needs_compiler, torch_only


def test_multipliers_are_pinned():
    """``rnd(2^16 exp(k / 256))`` for k = -1536..1536 from 40-digit decimals: the same on every machine."""
    table = multipliers()
    assert len(table) == 3073
    assert (table[0], table[1536], table[-1]) == (162.0, 65536.0, 26439109.0)
    assert table[-1] * (1 << FREQ_BITS) < 2**53  # every product and sum of products stays exact
    digest = hashlib.sha256(table.numpy().astype("<f8").tobytes()).hexdigest()
    assert digest == "ec72f731a671bb526815e3fb6380ffcccb2563f53a54d0dfb89891c8f6bb3686"


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), count=st.integers(1, 30))
def test_biased_tables_keep_every_symbol_codable_and_within_the_budget(seed, count):
    with torch_only():
        freq = lm_tables(count, seed)
        biases = AdaptiveBias(count, freq.shape[1])
        rng = np.random.default_rng(seed)
        biases.bias = torch.from_numpy(rng.integers(-LIMIT, LIMIT + 1, size=biases.bias.shape).astype(np.int32))
        tables = biases.tables(freq, list(range(count)))
    assert tables.min() >= 1
    assert tables.sum(dim=1).max() <= 1 << FREQ_BITS
    assert torch.equal(tables, tables.floor())


def test_zero_bias_keeps_the_models_table_up_to_rounding():
    freq = lm_tables(8, 3)
    tables = AdaptiveBias(8, freq.shape[1]).tables(freq, list(range(8)))
    assert torch.allclose(tables, freq, rtol=1e-6, atol=1.0)


def test_a_repeated_symbol_gains_probability_and_the_bias_stays_bounded():
    """(A symbol the model gives no mass at all, frequency 1, stays at 1: the bias multiplies mass.)"""
    freq = lm_tables(1, 5)
    symbol = int(torch.where(freq[0] > 1, freq[0], torch.inf).argmin())  # the least likely with a mass
    biases = AdaptiveBias(1, freq.shape[1])
    before = biases.tables(freq, [0])[0, symbol]
    for _ in range(200):
        biases.learn(biases.tables(freq, [0]), [0], [symbol])
    after = biases.tables(freq, [0])[0, symbol]
    assert after > 1000 * before or after > (1 << FREQ_BITS) / 2
    assert int(biases.bias.abs().max()) == LIMIT  # pinned at the limit, not beyond


def test_a_run_equals_position_by_position_tables_and_steps():
    freq = lm_tables(40, 9)
    symbols = np.random.default_rng(9).integers(0, freq.shape[1], size=40).tolist()
    whole = AdaptiveBias(2, freq.shape[1])
    run = whole.run(1, freq, symbols).tables
    stepped = AdaptiveBias(2, freq.shape[1])
    for i, symbol in enumerate(symbols):
        table = stepped.tables(freq[i : i + 1], [1])
        assert torch.equal(table[0], run[i])
        stepped.learn(table, [1], [symbol])
    assert torch.equal(whole.bias, stepped.bias)
    assert not whole.bias[0].any()  # the other row never learned


def test_learning_follows_the_definition():
    """One step by hand: every bias loses floor(F' * RATE / T'), the coded symbol gains RATE."""
    freq = lm_tables(1, 11)
    biases = AdaptiveBias(1, freq.shape[1])
    table = biases.tables(freq, [0])
    biases.learn(table, [0], [7])
    expected = -torch.floor(table[0] * (RATE / table[0].sum())).to(torch.int32)
    expected[7] += RATE
    assert torch.equal(biases.bias[0], expected)


@needs_compiler
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 6), steps=st.integers(1, 12))
def test_kernels_give_the_torch_paths_bits(built, seed, rows, steps):  # noqa: F811 (fixture)
    """Tables and learning over several steps, on a subset of rows in any order, against the torch path."""
    generator = torch.Generator().manual_seed(seed)
    width = 64  # lm_tables' alphabet
    compiled, reference = AdaptiveBias(rows, width), AdaptiveBias(rows, width)
    compiled.bias = torch.randint(-LIMIT, LIMIT + 1, (rows, width), generator=generator, dtype=torch.int32)
    reference.bias = compiled.bias.clone()
    for step in range(steps):
        live = torch.randperm(rows, generator=generator)[: max(1, rows - step % 2)].tolist()
        freq = torch.cat([lm_tables(1, seed + step * 7 + r) for r in live])
        symbols = torch.randint(0, width, (len(live),), generator=generator).tolist()
        table = built.bias_tables(freq, live, compiled.bias, multipliers(), LIMIT, compiled._budget())
        built.bias_learn(table, live, symbols, compiled.bias, RATE, LIMIT)
        with torch_only():
            expected = reference.tables(freq, live)
            reference.learn(expected, live, symbols)
        assert torch.equal(table, expected)
        assert torch.equal(compiled.bias, reference.bias)
