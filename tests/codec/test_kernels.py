"""The codec's compiled kernels (``llmpipe/codec/kernels.c``): the torch path's bits for each one (tables
from logits, the mixed tables' search and coding, the adaptive bias's runs), on every build this CPU runs."""

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from llmpipe.codec import kernels as codec_kernels
from llmpipe.codec.adaptive_bias import LIMIT, RATE, AdaptiveBias, multipliers
from llmpipe.codec.frequencies import (
    _EXP,
    FREQ_BITS,
    LOGIT_GRID,
    code_positions,
    find_symbols,
    frequency_tables_torch,
    kernels_for,
)
from llmpipe.codec.mixer import Prediction, mix_tables
from llmpipe.tokenization import ESCAPE_SYMBOLS
from tests.kernel_builds import kernel_fixtures, needs_compiler, torch_only

kernels, built = kernel_fixtures(kernels_for, codec_kernels.compiled)


@needs_compiler
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), positions=st.integers(1, 20), width=st.integers(2, 9000))
@example(seed=0, positions=1, width=257)  # one token's mass: torch's budget / tensor once rounded otherwise
def test_a_biased_run_gives_the_torch_paths_bits(built, seed, positions, width):
    """``bias_run`` (the encoder's tables and learning steps, one call per run, the threads splitting each
    pass) against ``AdaptiveBias.tables`` then ``learn`` per position in torch, from biases anywhere in
    their range (the limit included)."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(positions, width - ESCAPE_SYMBOLS if width > ESCAPE_SYMBOLS else width, generator=generator)
    freq = frequency_tables_torch(logits * 4, width - logits.shape[1])
    symbols = torch.randint(0, width, (positions,), generator=generator).tolist()
    start = torch.randint(-LIMIT, LIMIT + 1, (2, width), generator=generator, dtype=torch.int32)
    start[1, :3] = LIMIT
    mine, reference = AdaptiveBias(2, width), AdaptiveBias(2, width)
    mine.bias.copy_(start)
    reference.bias.copy_(start)
    budget = float((1 << FREQ_BITS) - width)
    tables_out, totals, sizes = built.bias_run(freq, mine.bias[1], symbols, multipliers(), RATE, LIMIT, budget)
    with torch_only():
        for i, symbol in enumerate(symbols):
            table = reference.tables(freq[i : i + 1], [1])
            reference.learn(table, [1], [symbol])
            assert torch.equal(tables_out[i], table[0])
            assert totals[i] == float(table.sum()) and sizes[i] == float(table[0, symbol])
    assert torch.equal(mine.bias, reference.bias)


@needs_compiler
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 9), width=st.integers(2, 3000), mixed=st.booleans())
def test_coding_in_mixed_tables_gives_the_torch_paths_bits(built, seed, rows, width, mixed):
    """The encoder's starts, sizes and totals in the mixed tables (``code_mixed``, none built) against
    ``mix_tables`` then ``code_positions`` in torch; weight 1 and no masses: the tables as they are."""
    generator = torch.Generator().manual_seed(seed)
    freq = frequency_tables_torch(torch.randn(rows, width, generator=generator) * 3, 0)
    symbols = torch.randint(0, width, (rows,), generator=generator)
    weights = (0.5 + torch.rand(rows, generator=generator, dtype=torch.float64) / 2).tolist() if mixed else [1.0] * rows
    masses: list[dict[int, float]] = [{} for _ in range(rows)]
    if mixed:  # sparse masses below, at and above each symbol
        picks = torch.randint(0, width, (rows, 4), generator=generator).tolist()
        masses = [{v: float(v % 5 * 700) for v in row} for row in picks]
        masses[0][int(symbols[0])] = 12345.0
    predictions = [Prediction(0.0, w, m, [], []) for w, m in zip(weights, masses, strict=True)]
    with torch_only():
        expected = code_positions(mix_tables(freq.clone(), predictions), symbols)
    assert built.code_mixed(freq, weights, masses, symbols.tolist()) == expected


@needs_compiler
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**32 - 1),
    rows=st.integers(1, 6),
    vocab=st.integers(2, 2000),
    spread=st.sampled_from([0.01, 1.0, 30.0]),
)
def test_tables_and_the_mixed_search_give_the_torch_paths_bits(built, seed, rows, vocab, spread):
    """Frequency tables from logits, then the decoder's search in mixed tables (LM weights below 1, sparse
    masses, rows in any order) against ``frequency_tables_torch``, ``mix_tables`` and ``find_symbols``."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=generator) * spread
    budget = float((1 << FREQ_BITS) - vocab - ESCAPE_SYMBOLS)
    freq = built.frequency_tables(logits, float(LOGIT_GRID), _EXP, budget, ESCAPE_SYMBOLS)
    assert torch.equal(freq, frequency_tables_torch(logits, ESCAPE_SYMBOLS))
    live = torch.randperm(rows, generator=generator)[: max(1, rows - 1)].tolist()
    weights = (0.5 + torch.rand(len(live), generator=generator, dtype=torch.float64) / 2).tolist()
    width = vocab + ESCAPE_SYMBOLS
    masses = [{int(v): float(v % 7 * 1000) for v in torch.randint(0, width, (5,), generator=generator)} for _ in live]
    predictions = [Prediction(0.0, w, m, [], []) for w, m in zip(weights, masses, strict=True)]
    mixed = mix_tables(freq[live], predictions)
    fractions = torch.rand(len(live), generator=generator, dtype=torch.float64)
    targets = (fractions * mixed.sum(dim=1)).floor().to(torch.int64).tolist()
    symbols, starts, sizes = find_symbols(mixed, lambda totals: targets)
    found = built.mixed_tables_search(freq, live, weights, masses, lambda totals: targets)
    assert found == (symbols, starts, sizes, freq[live, symbols].tolist())
