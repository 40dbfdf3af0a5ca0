"""The exact building blocks: per-row quantisation and integer matrix products.

Every function here returns the same bits on any machine, thread count and
batch shape, because it uses only
- reductions whose result does not depend on their order: ``max`` and sums
  of integers that provably fit the accumulator (bounds stated at each one);
- elementwise IEEE operations (``+ - * /``, ``sqrt``, ``round`` half to even,
  conversions), which are correctly rounded on every conforming device.
Divisions are always tensor by tensor, never by a Python number (GPU kernels
turn ``x / scalar`` into ``x * (1 / scalar)``, which rounds differently).
"""

from __future__ import annotations

from functools import cache

import torch

from llmpipe.engine import kernels as compiled_kernels
from llmpipe.engine.kernels import NetworkKernels
from llmpipe.numerics.native import enabled, fastest_seconds

ACT_MAX = 32639
"""Activations are int16 in [-ACT_MAX, ACT_MAX] = 127 * 256 + 127, so that both bytes of
``x = 256 * hi + lo`` (lo in [-128, 127]) fit an int8: hi in [-127, 127]."""
WEIGHT_MAX = 127
"""Weights are int8 in [-127, 127] with one float32 scale per output channel."""

_FP32_SPLIT = 1024
"""Reduction pieces for the float32 fallback: 128 * 127 * 1024 = 16,646,144 < 2^24, so every
partial sum of int8 x int8 products stays an exactly representable integer, in any order."""


def quantize_rows(x: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round ``x`` (float32) to integers in [-qmax, qmax] per row (last dimension).

    Returns the integer values (as float32) and the row scale (``x ~ q * scale``),
    shape ``(..., 1)``. An all-zero row gets scale 0. On the CPU in one pass of
    the compiled kernel when there is one (``kernels``), else :func:`quantize_rows_torch`:
    the same float32 operations, the same bits.
    """
    kernels = kernels_for(x.device)
    if kernels is None or x.dtype != torch.float32 or x.dim() == 0 or not x.numel():
        return quantize_rows_torch(x, qmax)
    q, amax = kernels.quantize_rows(x.contiguous(), qmax)
    return q, amax * (1.0 / qmax)  # as below


def quantize_rows_torch(x: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_rows` in torch operations (any device)."""
    amax = x.abs().amax(dim=-1, keepdim=True)
    limit = torch.full_like(amax, float(qmax))
    inverse = torch.where(amax > 0, limit / amax, torch.zeros_like(amax))
    q = torch.round(x * inverse).clamp_(-qmax, qmax)
    return q, amax * (1.0 / qmax)  # 1/qmax is rounded once, the same everywhere


def split_bytes(q: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Integers in [-ACT_MAX, ACT_MAX] (float32) -> ``high`` then ``low`` concatenated along ``dim`` (float32).

    ``q = 256 * high + low`` with ``low`` in [-128, 127] and ``high`` in [-127, 127].
    Every step is exact in float32: the values stay integers far below 2^24
    and the scaling is by a power of two.
    """
    high = torch.floor_((q + 128.0).mul_(1.0 / 256))
    low = q - high * 256.0
    return torch.cat([high, low], dim=dim)


def _fp32_split_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 x int8 -> int32 through float32 GEMMs on reduction pieces small enough to be exact."""
    total = torch.zeros(a.shape[0], b.shape[1], dtype=torch.int64, device=a.device)
    for k in range(0, a.shape[1], _FP32_SPLIT):
        piece = a[:, k : k + _FP32_SPLIT].float() @ b[k : k + _FP32_SPLIT].float()
        total += piece.to(torch.int64)
    return total.to(torch.int32)


def _padded_int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch._int_mm``, whose CUDA kernel needs M > 16 and K, N multiples of 8: zero padding adds nothing."""
    (m, k), n = a.shape, b.shape[1]
    rows, inner, cols = max(m, 17), -(-k // 8) * 8, -(-n // 8) * 8
    if a.is_cuda and (rows, inner, cols) != (m, k, n):
        a = torch.nn.functional.pad(a, (0, inner - k, 0, rows - m))
        b = torch.nn.functional.pad(b, (0, cols - n, 0, inner - k))
    return torch._int_mm(a, b)[:m, :n]


def _known_answer_ok(matmul, device: torch.device) -> bool:
    """Does ``matmul`` reproduce int64 arithmetic on extreme values (where saturating kernels fail)?"""
    generator = torch.Generator().manual_seed(0)
    cases = [
        (torch.full((4, 1536), -128, dtype=torch.int8), torch.full((1536, 16), -128, dtype=torch.int8)),
        (torch.full((4, 1536), 127, dtype=torch.int8), torch.full((1536, 16), -128, dtype=torch.int8)),
        (
            torch.randint(-128, 128, (33, 576), dtype=torch.int8, generator=generator),
            torch.randint(-128, 128, (576, 40), dtype=torch.int8, generator=generator),
        ),
    ]
    try:
        return all(
            torch.equal(matmul(a.to(device), b.to(device)).cpu().to(torch.int64), a.to(torch.int64) @ b.to(torch.int64))
            for a, b in cases
        )
    except (RuntimeError, NotImplementedError):
        return False


_INT8_MATMULS: dict[str, object] = {}
"""The int8 product chosen per device type, after its known-answer test."""


def _faster(first, second, device: torch.device):
    """Of two exact int8 products, the faster on a decoding step's shape (best of three): on CPUs without
    int8 instructions for oneDNN (AVX2 only), ``torch._int_mm`` ran at 1 G multiply-adds per second, 40x
    slower than the float32 split."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (128, 576), generator=generator, dtype=torch.int8).to(device)
    b = torch.randint(-128, 128, (576, 576), generator=generator, dtype=torch.int8).to(device)
    return first if fastest_seconds(lambda: first(a, b)) <= fastest_seconds(lambda: second(a, b)) else second


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ b`` for int8 ``a`` (M, K) and ``b`` (K, N), as int32.

    Bound: |a_ij * b_jk| <= 128 * 128, so any K < 131,072 keeps every partial
    sum inside int32. ``torch._int_mm`` is used when a known-answer test on
    extreme values passes on the device (the first time it is used there) and,
    on the CPU, it is faster than the float32 split above; otherwise that split.
    """
    device = a.device
    chosen = _INT8_MATMULS.get(device.type)
    if chosen is None:
        chosen = _padded_int_mm if _known_answer_ok(_padded_int_mm, device) else _fp32_split_mm
        if chosen is _padded_int_mm and device.type == "cpu":
            chosen = _faster(_padded_int_mm, _fp32_split_mm, device)
        _INT8_MATMULS[device.type] = chosen
    return chosen(a, b)


def int16_int8_matmul(q: torch.Tensor, weight_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``q @ weight_t`` for int16-range ``q`` (M, K) and int8 ``weight_t`` (K, N) as two exact int32 parts.

    ``q = 256 * hi + lo`` with both parts int8, so ``q @ w = 256 * (hi @ w) + lo @ w``:
    one int8 product on the stacked rows gives both terms (returned in that order).
    """
    rows = q.shape[0]
    both = int8_products(q, weight_t)
    return both[:rows], both[rows:]


def int8_products(q: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """:func:`int16_int8_matmul`'s two products stacked: (2M, N) int32, ``hi @ w`` rows first."""
    return int8_matmul(split_bytes_int8(q), weight_t)


def split_bytes_int8(q: torch.Tensor) -> torch.Tensor:
    """:func:`split_bytes` of (M, K) ``q`` along the rows, as int8 (2M, K): one pass of the compiled kernel
    on the CPU when there is one (``kernels``)."""
    kernels = kernels_for(q.device)
    if kernels is None or q.dtype != torch.float32 or not q.numel():
        return split_bytes(q).to(torch.int8)
    return kernels.split_bytes(q.contiguous())


def pair_rows(weight_t: torch.Tensor) -> torch.Tensor:
    """int8 ``(K, N)`` -> ``(ceil(K / 2), N, 2)``: rows ``2p`` and ``2p + 1`` interleaved column by column
    (a zero row after an odd K), the layout the compiled products read (``products.h``, PAIRED): 16 bytes
    are then the int16 pairs of 8 columns, widened in one instruction."""
    depth, cols = weight_t.shape
    if depth % 2:
        weight_t = torch.cat([weight_t, weight_t.new_zeros(1, cols)])
    return weight_t.view(-1, 2, cols).transpose(1, 2).contiguous()


def unpair_rows(pairs: torch.Tensor) -> torch.Tensor:
    """:func:`pair_rows` undone: ``(2 ceil(K / 2), N)`` contiguous (with its zero row after an odd K)."""
    return pairs.transpose(1, 2).reshape(-1, pairs.shape[1]).contiguous()


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``(N, K)`` -> int8 ``(N, K)`` and float32 scales ``(N,)``, one per output channel."""
    q, scale = quantize_rows(weight.to(torch.float32), WEIGHT_MAX)
    return q.to(torch.int8), scale[:, 0]


@cache
def _checked_kernels() -> NetworkKernels | None:
    """The engine's compiled kernels when they build and agree with the torch path here (once a process)."""
    kernels = compiled_kernels.compiled() if enabled() else None
    return kernels if kernels is not None and kernels_agree(kernels) else None


def kernels_for(device: torch.device) -> NetworkKernels | None:
    """The engine's kernels for tensors on ``device``, or None (use the torch path)."""
    return _checked_kernels() if device.type == "cpu" else None


def kernels_agree(kernels: NetworkKernels) -> bool:
    """Do the quantisation and byte split give torch's bits (ties at .5, all-zero rows, magnitudes from
    2^-30 to 2^30)? (``exact_transformer`` checks ``attention`` against its torch path per model.)"""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(9, 300, generator=generator) * torch.exp2(torch.randint(-30, 31, (9, 1), generator=generator))
    x[0] = 0.0
    x[1, :] = torch.arange(300) - 149.5  # ties
    quantised, amax = kernels.quantize_rows(x, ACT_MAX)
    reference, scale = quantize_rows_torch(x, ACT_MAX)
    quantise_ok = torch.equal(quantised, reference) and torch.equal(amax * (1.0 / ACT_MAX), scale)
    return quantise_ok and torch.equal(kernels.split_bytes(quantised), split_bytes(quantised).to(torch.int8))


@cache
def fused_products_win(kernels: NetworkKernels) -> bool:
    """Is ``kernels.exact_matmul`` faster here than torch's int8 product of the split rows with
    ``combine_products`` (the same bits)? Timed once on a decoding step's shape: torch's CPU product is
    fast only where oneDNN has int8 instructions for it (AVX-512 VNNI, AMX); elsewhere it ran at 1 G
    multiply-adds per second, 60-90x slower than the kernel."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randint(-ACT_MAX, ACT_MAX + 1, (64, 576), generator=generator).float()
    weight = torch.randint(-127, 128, (576, 576), generator=generator, dtype=torch.int8)
    row_scale, scale, pairs = torch.ones(64, 1), torch.ones(576), pair_rows(weight)

    own = fastest_seconds(lambda: kernels.exact_matmul(q, row_scale, pairs, scale, None))
    theirs = fastest_seconds(lambda: kernels.combine_products(int8_products(q, weight), row_scale, scale, None))
    return own < theirs
