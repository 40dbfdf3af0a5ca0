"""Exactness of the integer building blocks against int64 arithmetic."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmpipe.engine import integer_ops
from llmpipe.engine.integer_ops import ACT_MAX, int16_int8_matmul, pair_rows, quantize_rows, split_bytes, unpair_rows


def _random_ints(seed: int, shape: tuple[int, ...], low: int, high: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, high + 1, shape, generator=generator)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31), st.integers(1, 40), st.integers(1, 2100), st.integers(1, 24), st.booleans())
def test_int16_int8_matmul_is_exact(seed, m, k, n, extreme):
    if extreme:  # all products at their maximum: where saturating kernels go wrong
        q = torch.full((m, k), -ACT_MAX, dtype=torch.int64)
        w = torch.full((k, n), -128, dtype=torch.int64)
    else:
        q = _random_ints(seed, (m, k), -ACT_MAX, ACT_MAX)
        w = _random_ints(seed + 1, (k, n), -128, 127)
    high, low = int16_int8_matmul(q.float(), w.to(torch.int8))
    assert torch.equal(high.long() * 256 + low.long(), q @ w)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31), st.integers(1, 40), st.integers(1, 40))
def test_paired_rows_interleave_row_pairs_and_undo(seed, k, n):
    """``pairs[p, c]`` is ``(w[2p, c], w[2p + 1, c])``, a zero after an odd K, and unpairing gives w back."""
    w = _random_ints(seed, (k, n), -128, 127).to(torch.int8)
    pairs = pair_rows(w)
    assert pairs.shape == ((k + 1) // 2, n, 2) and pairs.is_contiguous()
    for p in range(pairs.shape[0]):
        assert torch.equal(pairs[p, :, 0], w[2 * p])
        assert torch.equal(pairs[p, :, 1], w[2 * p + 1] if 2 * p + 1 < k else torch.zeros(n, dtype=torch.int8))
    rows = unpair_rows(pairs)
    assert rows.is_contiguous() and torch.equal(rows[:k], w) and not rows[k:].any()


def test_float32_fallback_matches_int_mm():
    a = _random_ints(3, (17, 3000), -128, 127).to(torch.int8)
    b = _random_ints(4, (3000, 9), -128, 127).to(torch.int8)
    reference = a.long() @ b.long()
    assert torch.equal(integer_ops._fp32_split_mm(a, b).long(), reference)
    assert torch.equal(integer_ops.int8_matmul(a, b).long(), reference)


@settings(max_examples=50, deadline=None)
@given(st.integers(-ACT_MAX, ACT_MAX))
def test_split_bytes_round_trips(value):
    high, low = split_bytes(torch.tensor([[float(value)]])).int().tolist()
    assert -127 <= high[0] <= 127 and -128 <= low[0] <= 127
    assert high[0] * 256 + low[0] == value


def test_quantize_rows_bounds_and_zero_rows():
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5], [1e-30, -3e30, 7.0]])
    q, scale = quantize_rows(x, ACT_MAX)
    assert torch.equal(q[0], torch.zeros(3)) and scale[0, 0] == 0
    assert q.abs().max() == ACT_MAX and torch.equal(q, q.round())
    assert torch.allclose(q[1] * scale[1], x[1], rtol=1e-4)
