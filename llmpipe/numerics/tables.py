"""Lookup tables for the exact engine, built the same way on every machine.

``exp``, ``sin``, ``cos`` and the like come from the platform's math library
and may differ in the last bit between machines, which would change a
frequency table and break an archive. So the exact engine never calls them at
run time. Its tables are computed here either with Python's ``decimal``
module (whose ``exp`` is correctly rounded by specification, a software
library identical everywhere) or, for RoPE, with float64 polynomials made only
of IEEE ``+ - x /`` operations in a fixed order (each correctly rounded,
so bit-identical on every conforming machine). Then they are rounded once.
"""

from __future__ import annotations

import decimal
import math
from functools import cache

import numpy as np
import torch

_CONTEXT = decimal.Context(prec=40, rounding=decimal.ROUND_HALF_EVEN)


def decimal_exp(x: decimal.Decimal) -> decimal.Decimal:
    return _CONTEXT.exp(x)


@cache
def exp_table(grid: int, out_bits: int) -> np.ndarray:
    """``round(2**out_bits * exp(-k / grid))`` for k = 0, 1, ... down to the first 0 (int64).

    Index ``k`` is a non-negative distance from the row maximum measured in
    steps of ``1/grid``; indices past the end mean 0 (the caller clamps to the
    last entry, which is 0).
    """
    values = []
    scale = decimal.Decimal(2) ** out_bits
    k = 0
    while True:
        v = int((scale * decimal_exp(decimal.Decimal(-k) / grid)).to_integral_value(rounding=decimal.ROUND_HALF_EVEN))
        values.append(v)
        if v == 0:
            return np.array(values, dtype=np.int64)
        k += 1


ACTIVATION_GRID = 256  # activation input resolution: 1/256
ACTIVATION_LIMITS = {"silu": 16, "gelu": 8, "gelu_tanh": 8}
"""Past +-limit each activation is the identity or 0 to float32 precision (silu(-16) ~ -2e-6,
gelu(-8) ~ -5e-15); the engine applies that directly, so tables need only [-limit, limit]."""

_PI = decimal.Decimal("3.14159265358979323846264338327950288419716939937510582097494459")


def _silu(x: decimal.Decimal) -> decimal.Decimal:
    return _CONTEXT.divide(x, 1 + decimal_exp(-x))


def gaussian_cdf(x: decimal.Decimal) -> decimal.Decimal:
    """Phi(x) for x >= 0 from the all-positive series erf(z) = 2/sqrt(pi) e^(-z^2) sum (2z^2)^n z / (2n+1)!!.

    Every term is positive, so 40 significant digits survive at any z used here (z <= 8 / sqrt 2).
    """
    ctx = _CONTEXT
    z = ctx.divide(x, ctx.sqrt(decimal.Decimal(2)))
    two_z2 = ctx.multiply(2, ctx.multiply(z, z))
    term, total, n = z, z, 0
    while term > total.scaleb(-45):
        n += 1
        term = ctx.divide(ctx.multiply(term, two_z2), 2 * n + 1)
        total = ctx.add(total, term)
    erf = ctx.multiply(ctx.divide(2, ctx.sqrt(_PI)), ctx.multiply(decimal_exp(-z * z), total))
    return ctx.divide(1 + erf, 2)


def _gelu_positive(x: decimal.Decimal) -> decimal.Decimal:
    return _CONTEXT.multiply(x, gaussian_cdf(x))


def _gelu_tanh(x: decimal.Decimal) -> decimal.Decimal:
    ctx = _CONTEXT
    u = ctx.multiply(ctx.sqrt(ctx.divide(2, _PI)), x + decimal.Decimal("0.044715") * x * x * x)
    tanh = 1 - ctx.divide(2, decimal_exp(2 * u) + 1)
    return ctx.multiply(ctx.multiply(decimal.Decimal("0.5"), x), 1 + tanh)


@cache
def activation_table(name: str) -> np.ndarray:
    """``act(k / 256)`` for k in [-limit * 256, limit * 256], float32, correctly rounded from 40 digits."""
    limit = ACTIVATION_LIMITS[name] * ACTIVATION_GRID
    values = np.empty(2 * limit + 1, dtype=np.float64)
    for i, k in enumerate(range(-limit, limit + 1)):
        x = decimal.Decimal(k) / ACTIVATION_GRID
        if name == "silu":
            values[i] = float(_silu(x))
        elif name == "gelu_tanh":
            values[i] = float(_gelu_tanh(x))
        elif k >= 0:  # gelu; gelu(-x) = gelu(x) - x, so each Phi is computed once
            positive = _gelu_positive(x)
            values[i] = float(positive)
            values[limit - k] = float(positive - x)
    return values.astype(np.float32)


_TWO_PI_HI = 6.283185307179586  # float64 nearest 2*pi
_TWO_PI_LO = 2.4492935982947064e-16  # 2*pi - _TWO_PI_HI
_TAYLOR_TERMS = 16  # |x| <= pi: the first omitted term is below 1e-20


def _sin_cos(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sin and cos of float64 ``x`` with only + - x / and rint, so every IEEE machine agrees bit for bit."""
    k = np.rint(x / _TWO_PI_HI)
    r = (x - k * _TWO_PI_HI) - k * _TWO_PI_LO  # in [-pi, pi] (up to rounding)
    r2 = r * r
    sin = np.zeros_like(r)
    cos = np.zeros_like(r)
    for n in range(_TAYLOR_TERMS, 0, -1):  # Horner on the Taylor series, highest term first
        sin = (-1) ** n / math.factorial(2 * n + 1) + r2 * sin
        cos = (-1) ** n / math.factorial(2 * n) + r2 * cos
    return r * (1.0 + r2 * sin), 1.0 + r2 * cos


def rope_inverse_frequencies(theta: float, head_dim: int) -> np.ndarray:
    """``theta ** (-2i / head_dim)`` for i < head_dim / 2, correctly rounded to float64 via ``decimal``."""
    half = head_dim // 2
    log_theta = _CONTEXT.ln(decimal.Decimal(repr(theta)))
    return np.array([float(decimal_exp(-log_theta * i / half)) for i in range(half)], dtype=np.float64)


def rope_tables(theta: float, head_dim: int, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of ``position * inverse_frequency``, float32, shape (positions, head_dim)."""
    inv_freq = rope_inverse_frequencies(theta, head_dim)
    angles = np.arange(positions, dtype=np.float64)[:, None] * inv_freq[None, :]  # one correctly rounded product
    sin, cos = _sin_cos(angles)
    cos = np.concatenate([cos, cos], axis=1).astype(np.float32)
    sin = np.concatenate([sin, sin], axis=1).astype(np.float32)
    return cos, sin


def lookup(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` for a float tensor of non-negative integer indices (int32 indexing: faster than int64)."""
    return table.index_select(0, index.to(torch.int32).view(-1)).view(index.shape)
