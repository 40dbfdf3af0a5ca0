"""Coding a quantised steering vector: integers under a discretised Gaussian prior, range-coded.

The vector's values are ``step * q`` with integer ``q``; the prior is a
Gaussian of standard deviation ``scale`` (in steps, a multiple of 1/16 so the
header stores it exactly) discretised over the bins ``[-limit, limit]``,
``limit = max(1, floor(6 scale))``. Its integer frequencies come from
40-digit decimal arithmetic (``engine.tables.gaussian_cdf``), so every
machine builds the same table: ``f(q) = 1 + floor((2^16 - n) (Phi(u) - Phi(l)))``
with ``n = 2 limit + 1`` bins and ``l, u = (q -+ 1/2) / scale``. Values are coded
in order with ``coder.range_coder`` (FORMAT.md section 5).
"""

from __future__ import annotations

import decimal
import math

from llmpipe.coder.range_coder import RangeDecoder, RangeEncoder
from llmpipe.engine.tables import gaussian_cdf
from llmpipe.errors import ArchiveError

PRIOR_BITS = 16
SCALE_UNITS = 16
"""The prior's scale is stored as an integer number of 1/16 steps."""
MAX_SCALE_UNITS = 64 * SCALE_UNITS


def limit_of(scale_units: int) -> int:
    """The largest ``|q|`` the prior codes."""
    return max(1, (6 * scale_units) // SCALE_UNITS)


def gaussian_frequencies(scale_units: int) -> list[int]:
    """The prior's integer frequencies of ``q = -limit..limit`` (each at least 1, total at most 2^16)."""
    if not 1 <= scale_units <= MAX_SCALE_UNITS:
        raise ValueError(f"prior scale {scale_units}/{SCALE_UNITS} out of range")
    limit = limit_of(scale_units)
    scale = decimal.Decimal(scale_units) / SCALE_UNITS

    def phi(x: decimal.Decimal) -> decimal.Decimal:
        return gaussian_cdf(x) if x >= 0 else 1 - gaussian_cdf(-x)

    edges = [phi((decimal.Decimal(q) - decimal.Decimal("0.5")) / scale) for q in range(-limit, limit + 2)]
    budget = (1 << PRIOR_BITS) - (2 * limit + 1)
    return [
        1 + int((budget * (hi - lo)).to_integral_value(rounding=decimal.ROUND_FLOOR))
        for lo, hi in zip(edges, edges[1:], strict=False)
    ]


def scale_for(values: list[int]) -> int:
    """The prior scale (in 1/16 steps) matching the values' root mean square."""
    rms = math.sqrt(sum(v * v for v in values) / max(1, len(values)))
    return min(MAX_SCALE_UNITS, max(1, round(rms * SCALE_UNITS)))


def encode_values(values: list[int], scale_units: int) -> bytes:
    """Range-code integers already within the prior's ``[-limit, limit]``."""
    freq = gaussian_frequencies(scale_units)
    limit = limit_of(scale_units)
    starts = _cumulative(freq)
    encoder = RangeEncoder()
    for v in values:
        if not -limit <= v <= limit:
            raise ValueError(f"{v} outside the prior's range +-{limit}")
        encoder.encode(starts[v + limit], freq[v + limit], starts[-1])
    return encoder.finish()


def decode_values(data: bytes, count: int, scale_units: int) -> list[int]:
    """The ``count`` integers :func:`encode_values` coded (damaged data: :class:`ArchiveError`)."""
    try:
        freq = gaussian_frequencies(scale_units)
    except ValueError as exc:
        raise ArchiveError(f"corrupt header: steering {exc}") from None
    decoder = RangeDecoder(data)
    starts, limit = _cumulative(freq), limit_of(scale_units)
    return [decoder.decode_symbol(starts) - limit for _ in range(count)]


def _cumulative(freq: list[int]) -> list[int]:
    """``[0, f0, f0 + f1, ..., total]``."""
    starts = [0]
    for f in freq:
        starts.append(starts[-1] + f)
    return starts
