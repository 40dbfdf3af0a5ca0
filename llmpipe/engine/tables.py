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

_CONTEXT = decimal.Context(prec=40, rounding=decimal.ROUND_HALF_EVEN)


def _dexp(x: decimal.Decimal) -> decimal.Decimal:
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
        v = int((scale * _dexp(decimal.Decimal(-k) / grid)).to_integral_value(rounding=decimal.ROUND_HALF_EVEN))
        values.append(v)
        if v == 0:
            return np.array(values, dtype=np.int64)
        k += 1


SILU_GRID = 256  # SiLU input resolution: 1/256
SILU_LIMIT = 16 * SILU_GRID  # beyond +-16 SiLU is the identity or 0 to float32 precision


@cache
def silu_table() -> np.ndarray:
    """``silu(k / 256)`` for k in [-SILU_LIMIT, SILU_LIMIT], float32, correctly rounded from 40 digits."""
    values = np.empty(2 * SILU_LIMIT + 1, dtype=np.float64)
    one = decimal.Decimal(1)
    for i, k in enumerate(range(-SILU_LIMIT, SILU_LIMIT + 1)):
        x = decimal.Decimal(k) / SILU_GRID
        values[i] = float(_CONTEXT.divide(x, one + _dexp(-x)))
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
    return np.array([float(_dexp(-log_theta * i / half)) for i in range(half)], dtype=np.float64)


def rope_tables(theta: float, head_dim: int, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of ``position * inverse_frequency``, float32, shape (positions, head_dim)."""
    inv_freq = rope_inverse_frequencies(theta, head_dim)
    angles = np.arange(positions, dtype=np.float64)[:, None] * inv_freq[None, :]  # one correctly rounded product
    sin, cos = _sin_cos(angles)
    cos = np.concatenate([cos, cos], axis=1).astype(np.float32)
    sin = np.concatenate([sin, sin], axis=1).astype(np.float32)
    return cos, sin
