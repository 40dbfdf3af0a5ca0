"""The engine's compiled kernels (``llmpipe/engine/products.c``, ``rows.c``): the torch path's bits for each
one (attention on strided cache views, the matmul output, the activation, quantising and splitting), on
every build this CPU runs, and the same logits in every decoding step."""

from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmpipe.engine import kernels as engine_kernels
from llmpipe.engine.exact_transformer import ExactKVCache, ExactTransformer, _rms_norm_quantize
from llmpipe.engine.exact_weights import ExactWeight, prepare_exact_weights
from llmpipe.engine.integer_ops import ACT_MAX, kernels_for, pair_rows, quantize_rows_torch, split_bytes
from llmpipe.numerics import tables
from llmpipe.numerics.tables import lookup
from tests.conftest import ARCHITECTURES
from tests.kernel_builds import kernel_fixtures, needs_compiler, torch_only

kernels, built = kernel_fixtures(kernels_for, engine_kernels.compiled)


@pytest.fixture(scope="module")
def transformer(tiny_model) -> ExactTransformer:
    """A tiny model's exact transformer: its torch attention path is the reference (it reads only its
    device and exp table, so any head shapes can be put through it)."""
    return ExactTransformer(tiny_model.config, prepare_exact_weights(tiny_model.config, tiny_model.weights))


@needs_compiler
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**32 - 1),
    rows=st.integers(1, 3),
    kv_heads=st.integers(1, 3),
    group=st.integers(1, 5),  # kernels.c takes the heads sharing a key four at a time: 5 makes 4 + 1
    hd=st.sampled_from([8, 16, 32, 64, 80, 128]),
    length=st.integers(1, 120),
    queries=st.integers(1, 40),
    extreme=st.booleans(),
)
def test_attention_gives_the_torch_paths_bits(
    built, transformer, seed, rows, kv_heads, group, hd, length, queries, extreme
):
    """The fused attention against ``_attention_torch`` on the second layer of a longer cache (strided
    views): one to fifteen queries (decoding steps, one query at a time) and sixteen to forty (full-sequence
    passes, tiles of sixteen as exact products), lengths across the 16-position blocks, every magnitude the
    bounds allow."""
    queries = min(queries, length)
    shape = replace(transformer.config, num_hidden_layers=2, num_key_value_heads=kv_heads, head_dim=hd)
    cache = ExactKVCache(shape, rows + 1, length + 7, torch.device("cpu"))
    generator = torch.Generator().manual_seed(seed)
    for cached in (cache.keys, cache.values):
        cached.copy_(torch.randint(-127, 128, cached.shape, generator=generator, dtype=torch.int8))
    for scales in (cache.key_scales, cache.value_scales):  # from 2^-12 to 2^3
        scales.copy_(torch.rand(scales.shape, generator=generator) * torch.exp2(torch.randint(-12, 4, scales.shape)))
    qq = torch.randint(-ACT_MAX, ACT_MAX + 1, (rows, kv_heads, group, queries, hd), generator=generator).float()
    qs = torch.rand(rows, kv_heads, group, queries, generator=generator) * 2e-3
    if extreme:  # largest dot products, and one position taking all the weight (w = 2^15)
        cache.keys[1] = -127
        cache.values[1] = 127
        qq[:] = ACT_MAX
        cache.value_scales[1, :, :, 0] = 16.0
    expected = transformer._attention_torch(qq, qs, cache, 1, length - queries)
    cached = tuple(x[1, :rows].flatten(0, 1) for x in (cache.keys, cache.values, cache.key_scales, cache.value_scales))
    queries_int = qq.to(torch.int16).reshape(rows * kv_heads, group, queries, hd)
    got = built.attention(
        queries_int, qs.reshape(rows * kv_heads, group, queries), cached, transformer.attention_exp, length
    )
    assert torch.equal(got.view_as(expected), expected)


def test_a_disagreeing_attention_kernel_is_not_used(tiny_model, kernels, monkeypatch):
    """The per-model check (extreme values, one and five queries) catches an attention off by one unit."""
    right = type(kernels).attention

    def off_by_one_ulp(self, *arguments):
        out = right(self, *arguments)
        return torch.nextafter(out, torch.full_like(out, float("inf")))

    monkeypatch.setattr(type(kernels), "attention", off_by_one_ulp)
    model = ExactTransformer(tiny_model.config, prepare_exact_weights(tiny_model.config, tiny_model.weights))
    assert model.kernels is kernels and model.attention_kernels is None


@needs_compiler
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**32 - 1),
    rows=st.integers(1, 40),
    columns=st.integers(1, 300),
    exponent=st.integers(-20, 20),
    bias=st.booleans(),
)
def test_combining_products_gives_the_torch_paths_bits(built, seed, rows, columns, exponent, bias):
    """``ExactWeight``'s output from the two int32 products, up to the int32 extremes (rounded to float32)."""
    generator = torch.Generator().manual_seed(seed)
    parts = torch.randint(-(2**31), 2**31, (2 * rows, columns), generator=generator, dtype=torch.int32)
    row_scale = torch.rand(rows, 1, generator=generator) * 2.0**exponent
    scale = torch.rand(columns, generator=generator) * 2.0**-exponent
    bias_values = torch.randn(columns, generator=generator) if bias else None
    expected = parts[:rows].float().mul_(256.0).add_(parts[rows:].float()).mul_(row_scale).mul_(scale)
    if bias_values is not None:
        expected = expected.add_(bias_values)
    assert torch.equal(built.combine_products(parts, row_scale, scale, bias_values), expected)


@needs_compiler
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**32 - 1),
    rows=st.one_of(st.integers(1, 8), st.integers(9, 24), st.integers(25, 40)),  # up to 24: the weights unpacked
    depth=st.integers(1, 2100),
    columns=st.integers(1, 70),
    bias=st.booleans(),
    layer_norm=st.booleans(),
    magnitude=st.sampled_from(["random", "small", "extreme"]),
)
def test_exact_matmul_gives_the_torch_paths_bits(built, seed, rows, depth, columns, bias, layer_norm, magnitude):
    """One int16 product per weight against ``ExactWeight``'s torch path (two int8 products, the spec's
    roundings): any shape (tails of the 6 x 16 tiles, odd depths, jobs of up to 24 rows that skip the packing,
    8 rows at a time),
    LayerNorm's mean, and rows whose hi or lo
    parts pass the bound where one rounding of 256 H + L would differ (they take the second product)."""
    generator = torch.Generator().manual_seed(seed)
    limit = {"random": ACT_MAX, "small": 300, "extreme": ACT_MAX}[magnitude]
    q = torch.randint(-limit, limit + 1, (rows, depth), generator=generator).float()
    weight = torch.randint(-127, 128, (depth, columns), generator=generator, dtype=torch.int8)
    if magnitude == "extreme":  # every product at its largest: sums past int32 and lo parts past the bound
        q[0] = -ACT_MAX
        q[rows // 2, ::3] = 127.0
        weight[:, 0] = -127
    row_scale = torch.rand(rows, 1, generator=generator) * 2e-3
    scale = torch.rand(columns, generator=generator) * 1e-2
    offsets = torch.randn(columns, generator=generator) if bias else None
    mean = torch.randn(rows, 1, generator=generator, dtype=torch.float64) * 50 if layer_norm else None
    pairs = pair_rows(weight)
    reference = ExactWeight(pairs, scale, offsets)  # no kernels: the torch path
    expected = reference(q, row_scale, mean)
    sums = reference.row_sums if layer_norm else None
    assert torch.equal(built.exact_matmul(q, row_scale, pairs, scale, offsets, mean, sums), expected)


@needs_compiler
def test_exact_matmul_rows_past_the_bound_take_the_specs_two_roundings(built):
    """Rows whose exact H = hi . w passes 2^24 (aligned signs over 1,536 products), where f32(H) * 256 + f32(L)
    and one rounding of 256 H + L differ in some outputs: the kernel gives the spec's value there too."""
    generator = torch.Generator().manual_seed(0)
    q = torch.full((4, 1536), float(-ACT_MAX))
    q.scatter_(
        1,
        torch.randint(0, 1536, (4, 40), generator=generator),
        torch.randint(-ACT_MAX, ACT_MAX + 1, (4, 40), generator=generator).float(),
    )
    weight = torch.full((1536, 64), -127, dtype=torch.int8)
    changed = torch.randint(0, 1536, (200,), generator=generator), torch.randint(0, 64, (200,), generator=generator)
    weight[changed] = torch.randint(-127, 128, (200,), generator=generator).to(torch.int8)
    high = torch.floor((q + 128) / 256)
    exact_high, exact_low = high.double() @ weight.double(), (q - 256 * high).double() @ weight.double()
    once = (256 * exact_high + exact_low).float()
    spec = exact_high.float() * 256 + exact_low.float()
    assert (once != spec).any(), "the case must reach where the two roundings differ"
    ones = torch.ones(4, 1), torch.ones(64)
    assert torch.equal(built.exact_matmul(q, ones[0], pair_rows(weight), ones[1], None), spec)


@needs_compiler
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 8, 12, 24])
def test_a_few_rows_split_between_threads_give_the_torch_paths_bits(built, rows):
    """A decoding step's products (up to 24 rows, 8 at a time) read the weights unpacked, each thread its own run of the
    weights' rows, with sums past int32's reach (blocks of 512 products): every repetition the torch path's
    bits. (A race between the threads' sums once showed up here in a few of ten repetitions.)"""
    generator = torch.Generator().manual_seed(rows)
    q = (torch.randint(0, 2, (rows, 1100), generator=generator).float() * 2 - 1) * ACT_MAX
    weight = torch.randint(-127, 128, (1100, 600), generator=generator, dtype=torch.int8)
    row_scale, scale = torch.rand(rows, 1, generator=generator) * 1e-3, torch.rand(600, generator=generator) * 1e-2
    pairs = pair_rows(weight)
    expected = ExactWeight(pairs, scale, None)(q, row_scale)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for _ in range(10):
            assert torch.equal(built.exact_matmul(q, row_scale, pairs, scale, None), expected)
    finally:
        torch.set_num_threads(threads)


@needs_compiler
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**32 - 1),
    rows=st.integers(1, 40),
    columns=st.integers(1, 300),
    name=st.sampled_from(sorted(tables.ACTIVATION_LIMITS)),
    gated=st.booleans(),
)
def test_activation_gives_the_torch_paths_bits(built, seed, rows, columns, name, gated):
    """The table activation (times the gate's other half) on inputs across and past the table's range,
    halves of the grid included, read from the halves of one (rows, 2 * columns) tensor as the MLP does."""
    generator = torch.Generator().manual_seed(seed)
    both = torch.randn(rows, 2 * columns, generator=generator) * 12
    both[0, : columns // 2] = (torch.arange(columns // 2) - columns // 4 + 0.5) / tables.ACTIVATION_GRID
    x, up = both[:, :columns], both[:, columns:]
    table = torch.from_numpy(tables.activation_table(name))
    limit = (len(table) - 1) // 2
    steps = torch.round(x * float(tables.ACTIVATION_GRID))
    looked_up = lookup(table, steps.clamp(-limit, limit).add_(limit))
    expected = torch.where(steps >= limit, x, torch.where(steps <= -limit, 0.0, looked_up))
    if gated:
        expected = expected * up
    got = built.activation(x, up if gated else None, tables.ACTIVATION_GRID, table)
    assert torch.equal(got, expected)


@needs_compiler
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**32 - 1),
    rows=st.integers(1, 70),
    columns=st.integers(1, 600),
    exponent=st.integers(-40, 40),
    qmax=st.sampled_from([127, ACT_MAX]),
    transposed=st.booleans(),
)
def test_quantising_and_splitting_give_torchs_bits(built, seed, rows, columns, exponent, qmax, transposed):
    """The one-pass kernels against torch's passes: any magnitude, ties at .5, all-zero rows, views."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, columns, generator=generator) * 2.0**exponent
    x[0] = 0.0
    if rows > 1:
        x[1] = torch.arange(columns) - columns / 2 - 0.5  # halves: round half to even
    if transposed:
        x = x.t().contiguous().t()  # the same values through a strided view
    q, amax = built.quantize_rows(x.contiguous(), qmax)
    reference, reference_scale = quantize_rows_torch(x, qmax)
    assert torch.equal(q, reference) and torch.equal(amax * (1.0 / qmax), reference_scale)
    if qmax == ACT_MAX:
        assert torch.equal(built.split_bytes(q), split_bytes(q).to(torch.int8))
    if qmax == ACT_MAX:  # and RMSNorm's statistic on top
        with torch_only():
            expected = _rms_norm_quantize(x, 1e-5)
        q_rms, row_scale = built.rms_norm_quantize(x.contiguous(), qmax, 1e-5)
        assert torch.equal(q_rms, expected.q) and torch.equal(row_scale, expected.scale)


@needs_compiler
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_decoding_steps_are_the_same_with_and_without_kernels(tiny_models, kernels, arch):
    """Each step (and a 16-position prefill, the longest pass they take) with the kernels equals the torch
    path's, at two thread counts."""
    model = tiny_models[arch]
    weights = prepare_exact_weights(model.config, model.weights)
    fast = ExactTransformer(model.config, weights)
    with torch_only():
        plain = ExactTransformer(model.config, weights)
    assert fast.kernels is not None and plain.kernels is None
    tokens = torch.randint(0, model.config.vocab_size, (5, 40), generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    with torch.inference_mode():
        caches = fast.new_cache(5, 40), plain.new_cache(5, 40)
        fast.prefill(tokens[:, :16], caches[0])
        with torch_only():
            plain.prefill(tokens[:, :16], caches[1])
        try:
            for p in range(16, 40):
                torch.set_num_threads(1 + p % 2)
                step = tokens[:, p : p + 1]
                with torch_only():
                    expected = plain.forward(step, caches[1])
                assert torch.equal(fast.forward(step, caches[0]), expected)
        finally:
            torch.set_num_threads(threads)
