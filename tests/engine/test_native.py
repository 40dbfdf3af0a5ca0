"""The compiled attention kernels: int64 arithmetic's answers on strided cache views, and the same logits
as the torch path in every decoding step."""

import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmpipe.engine import native
from llmpipe.engine.exact_transformer import ExactTransformer, prepare_exact_weights
from llmpipe.engine.integer_ops import ACT_MAX, quantize_rows, quantize_rows_torch, split_bytes, split_bytes_int8
from tests.conftest import ARCHITECTURES

needs_compiler = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler here: the torch path runs")


@pytest.fixture(scope="module")
def kernels() -> native.Kernels:
    found = native.kernels_for(torch.device("cpu"))
    assert found is not None, "a C compiler is here, yet the kernels were not built or failed their check"
    return found


@needs_compiler
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**32 - 1),
    rows=st.integers(1, 7),
    group=st.integers(1, 5),
    hd=st.sampled_from([8, 32, 64, 80]),
    length=st.integers(1, 70),
    extreme=st.booleans(),
)
def test_kernels_give_exact_integer_products_on_cache_slices(kernels, seed, rows, group, hd, length, extreme):
    generator = torch.Generator().manual_seed(seed)
    capacity = length + 5  # a slice of a longer cache: rows lie capacity * hd apart
    cache = torch.randint(-127, 128, (rows + 1, capacity, hd), generator=generator, dtype=torch.int8)[1:]
    q = torch.randint(-32639, 32640, (rows, group, hd), generator=generator, dtype=torch.int16)
    weights = torch.randint(0, 2**15 // length + 1, (rows, group, length), generator=generator, dtype=torch.int32)
    if extreme:  # the largest magnitudes the bounds allow
        cache[:] = -127
        q[:] = 32639
        weights[:] = 0
        weights[..., 0] = 2**15
    wide = cache[:, :length].to(torch.int64)
    scores = kernels.scores(q, cache, length)
    assert torch.equal(scores.to(torch.int64), q.to(torch.int64) @ wide.transpose(1, 2))
    assert torch.equal(kernels.mix(weights, cache, length).to(torch.int64), weights.to(torch.int64) @ wide)


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
def test_quantising_and_splitting_give_torchs_bits(kernels, seed, rows, columns, exponent, qmax, transposed):
    """The one-pass kernels against torch's passes: any magnitude, ties at .5, all-zero rows, views."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, columns, generator=generator) * 2.0**exponent
    x[0] = 0.0
    if rows > 1:
        x[1] = torch.arange(columns) - columns / 2 - 0.5  # halves: round half to even
    if transposed:
        x = x.t().contiguous().t()  # the same values through a strided view
    q, scale = quantize_rows(x, qmax)
    reference, reference_scale = quantize_rows_torch(x, qmax)
    assert torch.equal(q, reference) and torch.equal(scale, reference_scale)
    if qmax == ACT_MAX:
        assert torch.equal(split_bytes_int8(q), split_bytes(q).to(torch.int8))


@needs_compiler
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_decoding_steps_are_the_same_with_and_without_kernels(tiny_models, kernels, arch):
    """Each step (and a 16-position prefill, the longest pass they take) with the kernels equals the torch
    path's, at two thread counts."""
    model = tiny_models[arch]
    weights = prepare_exact_weights(model.config, model.weights)
    fast, plain = ExactTransformer(model.config, weights), ExactTransformer(model.config, weights, native=False)
    assert fast.kernels is not None and plain.kernels is None
    tokens = torch.randint(0, model.config.vocab_size, (5, 40), generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    with torch.inference_mode():
        caches = fast.new_cache(5, 40), plain.new_cache(5, 40)
        fast.prefill(tokens[:, :16], caches[0])
        plain.prefill(tokens[:, :16], caches[1])
        try:
            for p in range(16, 40):
                torch.set_num_threads(1 + p % 2)
                step = tokens[:, p : p + 1]
                assert torch.equal(fast.forward(step, caches[0]), plain.forward(step, caches[1]))
        finally:
            torch.set_num_threads(threads)


def test_without_a_compiler_the_torch_path_runs(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("LLMPIPE_CACHE", str(tmp_path))
    native._kernels.cache_clear()
    try:
        assert native.kernels_for(torch.device("cpu")) is None
    finally:
        native._kernels.cache_clear()


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("LLMPIPE_NATIVE", "0")
    native._kernels.cache_clear()
    try:
        assert native.kernels_for(torch.device("cpu")) is None
    finally:
        native._kernels.cache_clear()
