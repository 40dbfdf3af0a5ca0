"""The priors a quantised steering vector is range-coded with: integer symbols in, bytes out.

Two priors, both built from integers only, so every machine codes the same:

- ``gaussian``: a Gaussian of standard deviation ``scale`` (in quantiser
  steps, a multiple of 1/16 so the header stores it exactly) discretised over
  the bins ``[-limit, limit]``, ``limit = max(1, floor(6 scale))``. Its
  frequencies come from 40-digit decimal arithmetic
  (``numerics.tables.gaussian_cdf``): ``f(q) = 1 + floor((2^16 - n) (Phi(u) -
  Phi(l)))`` with ``n = 2 limit + 1`` bins and ``l, u = (q -+ 1/2) / scale``.
  One number of side information.
- ``empirical``: the symbols' own histogram over ``[low, high]``, learned
  while coding (every count starts at 1 and grows by 1 per symbol seen, the
  Laplace estimator): the adaptive form of sending the histogram, whose cost
  it matches within a few bits per bin without a table in the header.

Symbols are coded in order with ``coder.range_coder`` (FORMAT.md section 5).
"""

from __future__ import annotations

import decimal
import functools
import math

from llmpipe.codec.range_coder import RangeDecoder, RangeEncoder
from llmpipe.errors import ArchiveError
from llmpipe.numerics.tables import gaussian_cdf

PRIORS = ("gaussian", "empirical")
PRIOR_BITS = 16
SCALE_UNITS = 16
"""The Gaussian prior's scale is stored as an integer number of 1/16 steps."""
MAX_SCALE_UNITS = 64 * SCALE_UNITS
EMPIRICAL_LIMIT = 2048
"""The empirical prior codes ``[low, high]`` within ``[-2048, 2047]``."""


def limit_of(scale_units: int) -> int:
    """The largest ``|q|`` the Gaussian prior codes."""
    return max(1, (6 * scale_units) // SCALE_UNITS)


@functools.lru_cache(maxsize=1024)
def gaussian_frequencies(scale_units: int) -> tuple[int, ...]:
    """The Gaussian prior's integer frequencies of ``q = -limit..limit`` (each at least 1, total at most 2^16)."""
    if not 1 <= scale_units <= MAX_SCALE_UNITS:
        raise ValueError(f"prior scale {scale_units}/{SCALE_UNITS} out of range")
    limit = limit_of(scale_units)
    scale = decimal.Decimal(scale_units) / SCALE_UNITS

    def phi(x: decimal.Decimal) -> decimal.Decimal:
        return gaussian_cdf(x) if x >= 0 else 1 - gaussian_cdf(-x)

    edges = [phi((decimal.Decimal(q) - decimal.Decimal("0.5")) / scale) for q in range(-limit, limit + 2)]
    budget = (1 << PRIOR_BITS) - (2 * limit + 1)
    return tuple(
        1 + int((budget * (hi - lo)).to_integral_value(rounding=decimal.ROUND_FLOOR))
        for lo, hi in zip(edges, edges[1:], strict=False)
    )


def scale_for(values: list[int]) -> int:
    """The Gaussian prior's scale (in 1/16 steps) matching the values' root mean square."""
    rms = math.sqrt(sum(v * v for v in values) / max(1, len(values)))
    return min(MAX_SCALE_UNITS, max(1, round(rms * SCALE_UNITS)))


class _Gaussian:
    """A fixed table over ``[-limit, limit]``."""

    def __init__(self, scale_units: int) -> None:
        self.low = -limit_of(scale_units)
        self.starts = _cumulative(gaussian_frequencies(scale_units))

    def seen(self, symbol: int) -> None:
        pass


class _Empirical:
    """Counts over ``[low, high]``, each starting at 1, plus 1 per symbol seen."""

    def __init__(self, low: int, high: int) -> None:
        if not -EMPIRICAL_LIMIT <= low <= high < EMPIRICAL_LIMIT:
            raise ValueError(f"empirical prior range [{low}, {high}] out of bounds")
        self.low = low
        self.starts = _cumulative([1] * (high - low + 1))

    def seen(self, symbol: int) -> None:
        for i in range(symbol + 1, len(self.starts)):
            self.starts[i] += 1


def _prior(name: str, parameters: dict) -> _Gaussian | _Empirical:
    """The prior ``name`` with its header parameters (``prior_scale``, or ``low``/``high``)."""
    if name == "gaussian":
        return _Gaussian(parameters["prior_scale"])
    if name == "empirical":
        return _Empirical(parameters["low"], parameters["high"])
    raise ValueError(f"unknown prior {name!r}")


def prior_parameters(name: str, values: list[int]) -> dict:
    """The side information ``name`` needs to code ``values``: what the header stores beside the data."""
    if name == "gaussian":
        return {"prior_scale": scale_for(values)}
    if name == "empirical":
        low, high = (max(-EMPIRICAL_LIMIT, min(EMPIRICAL_LIMIT - 1, v)) for v in (min(values), max(values)))
        return {"low": low, "high": high}
    raise ValueError(f"unknown prior {name!r}")


def in_range(name: str, parameters: dict, values: list[int]) -> list[int]:
    """``values`` clamped into what the prior codes (the Gaussian's ``+-limit``, the empirical's range)."""
    if name == "gaussian":
        low, high = -limit_of(parameters["prior_scale"]), limit_of(parameters["prior_scale"])
    else:
        low, high = parameters["low"], parameters["high"]
    return [max(low, min(high, v)) for v in values]


def encode_values(values: list[int], name: str, parameters: dict) -> bytes:
    """Range-code integers already within the prior's range."""
    prior = _prior(name, parameters)
    encoder = RangeEncoder()
    for v in values:
        symbol = v - prior.low
        if not 0 <= symbol < len(prior.starts) - 1:
            raise ValueError(f"{v} outside the {name} prior's range")
        encoder.encode(prior.starts[symbol], prior.starts[symbol + 1] - prior.starts[symbol], prior.starts[-1])
        prior.seen(symbol)
    return encoder.finish()


def decode_values(data: bytes, count: int, name: str, parameters: dict) -> list[int]:
    """The ``count`` integers :func:`encode_values` coded (damaged data or parameters: :class:`ArchiveError`)."""
    try:
        prior = _prior(name, parameters)
    except (ValueError, KeyError, TypeError) as exc:
        raise ArchiveError(f"corrupt header: steering prior: {exc}") from None
    decoder = RangeDecoder(data)
    values = []
    for _ in range(count):
        symbol = decoder.decode_symbol(prior.starts)
        values.append(symbol + prior.low)
        prior.seen(symbol)
    return values


def _cumulative(freq) -> list[int]:
    """``[0, f0, f0 + f1, ..., total]``."""
    starts = [0]
    for f in freq:
        starts.append(starts[-1] + f)
    return starts
