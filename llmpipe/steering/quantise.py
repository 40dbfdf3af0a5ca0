"""Quantising a learned prompt for the header: a quantiser, a prior for its symbols, and the record.

Two quantisers, as in the source study:

- ``uniform``: ``value = step * q`` for an integer ``q``, ``step`` a power of
  two (``rms / 8`` down to ``rms``, ``rms`` the token embeddings' root mean
  square), so every value is exact in float32; ``q`` is coded with either
  prior of ``hyperprior`` (Gaussian or empirical). The prior changes the
  vector's bits, never the vector.
- ``lloyd``: Lloyd-Max (one-dimensional k-means) levels fitted to the values,
  stored as integers on the grid ``rms / 64`` (a power of two); each value is
  the index of its nearest level, coded with the empirical prior.

The record (the header's ``steering`` fields besides ``mode`` and ``tokens``)
holds the quantiser, its step and levels, the prior's parameters and the
range-coded symbols in base64. Both sides build the prompt from the record:
the encoder codes the text with the vector decoded back, not its own floats.
"""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass

import numpy as np

from llmpipe.errors import ArchiveError
from llmpipe.steering.hyperprior import PRIORS, decode_values, encode_values, in_range, prior_parameters

UNIFORM_DIVISORS = (8, 4, 2, 1)
"""The uniform quantiser's steps tried: ``rms / d`` rounded to a power of two."""
LLOYD_LEVELS = (4, 8, 16)
"""The Lloyd-Max level counts tried."""
LLOYD_GRID_DIVISOR = 64
"""Lloyd-Max levels are stored on the grid ``rms / 64`` (rounded to a power of two)."""
MAX_LLOYD_LEVELS = 256


def power_of_two_step(rms: float, divisor: int) -> float:
    """``rms / divisor`` rounded to a power of two: ``step * integer`` is exact in float32."""
    return float(2.0 ** round(math.log2(rms / divisor)))


def finest_step(rms: float) -> float:
    """The finest uniform grid tried; training quantises to it."""
    return power_of_two_step(rms, max(UNIFORM_DIVISORS))


@dataclass(frozen=True)
class CodedVector:
    """A prompt's header record (quantiser, prior, data) and the values it decodes to ((P, C) float32)."""

    coding: dict
    values: np.ndarray

    @property
    def bits(self) -> int:
        """The range-coded symbols' size (the record's other fields are a few numbers)."""
        return 8 * len(base64.b64decode(self.coding["data"]))

    @property
    def label(self) -> str:
        return f"{quantiser_label(self.coding)}, {self.coding['prior']}"


def quantiser_label(coding: dict) -> str:
    """A coding's quantiser in a few words: ``uniform step 2^-3`` or ``lloyd 4 levels``."""
    if coding["quantiser"] == "lloyd":
        return f"lloyd {len(coding['levels'])} levels"
    return f"uniform step 2^{round(math.log2(coding['step']))}"


def uniform(values: np.ndarray, step: float, prior: str) -> CodedVector:
    """``values`` rounded to multiples of ``step`` and coded with ``prior``."""
    q = np.round(values.astype(np.float64) / step).astype(np.int64).reshape(-1).tolist()
    parameters = prior_parameters(prior, q)
    q = in_range(prior, parameters, q)
    data = encode_values(q, prior, parameters)
    coding = {"quantiser": "uniform", "step": step, "prior": prior, **parameters, "data": _b64(data)}
    return _decoded(coding, values.shape)


def lloyd_max(values: np.ndarray, count: int, grid: float, iterations: int = 50) -> CodedVector:
    """``count`` Lloyd-Max levels fitted to ``values`` (started at their quantiles), on multiples of ``grid``;
    each value becomes its nearest level's index, coded with the empirical prior."""
    flat = values.astype(np.float64).reshape(-1)
    levels = np.quantile(flat, (np.arange(count) + 0.5) / count)
    for _ in range(iterations):
        nearest = np.abs(flat[:, None] - levels[None, :]).argmin(1)
        levels = np.array([flat[nearest == k].mean() if (nearest == k).any() else levels[k] for k in range(count)])
    grid_levels = sorted(set(np.round(levels / grid).astype(np.int64).tolist()))
    index = np.abs(flat[:, None] - np.array(grid_levels, dtype=np.float64)[None, :] * grid).argmin(1).tolist()
    parameters = {"low": 0, "high": len(grid_levels) - 1}
    data = encode_values(index, "empirical", parameters)
    coding = {"quantiser": "lloyd", "step": grid, "levels": grid_levels, "prior": "empirical", **parameters}
    return _decoded({**coding, "data": _b64(data)}, values.shape)


def candidates(values: np.ndarray, rms: float) -> list[CodedVector]:
    """Every coding tried for a learned prompt: each uniform step with each prior, and each Lloyd-Max size."""
    found = [uniform(values, power_of_two_step(rms, d), prior) for d in UNIFORM_DIVISORS for prior in PRIORS]
    grid = power_of_two_step(rms, LLOYD_GRID_DIVISOR)
    return found + [lloyd_max(values, k, grid) for k in LLOYD_LEVELS]


def decode_coding(coding: dict, tokens: int, hidden_size: int) -> np.ndarray:
    """The (tokens, hidden_size) float32 values a record codes; damaged records: :class:`ArchiveError`."""
    quantiser = coding.get("quantiser", "uniform")  # llmpipe 0.3 wrote uniform/Gaussian without the field
    step, prior = coding.get("step"), coding.get("prior")
    ok = isinstance(step, float) and 0 < step < 1e6 and math.log2(step).is_integer() and prior in PRIORS
    ok = ok and isinstance(coding.get("data"), str) and quantiser in ("uniform", "lloyd")
    if not ok:
        raise ArchiveError("corrupt header: steering learned prompt")
    try:
        data = base64.b64decode(coding["data"], validate=True)
    except (ValueError, binascii.Error):
        raise ArchiveError("corrupt header: steering learned prompt data") from None
    symbols = decode_values(data, tokens * hidden_size, prior, coding)
    if quantiser == "lloyd":
        levels = coding.get("levels")
        ok = isinstance(levels, list) and 1 <= len(levels) <= MAX_LLOYD_LEVELS and prior == "empirical"
        if not ok or not all(isinstance(v, int) and abs(v) < 1 << 24 for v in levels):
            raise ArchiveError("corrupt header: steering Lloyd-Max levels")
        if coding.get("low") != 0 or coding.get("high") != len(levels) - 1:
            raise ArchiveError("corrupt header: steering Lloyd-Max indices")
        symbols = [levels[i] for i in symbols]
    if any(abs(v) >= 1 << 24 for v in symbols):
        raise ArchiveError("corrupt header: steering value out of range")
    return (np.array(symbols, dtype=np.float32) * np.float32(step)).reshape(tokens, hidden_size)


def _decoded(coding: dict, shape: tuple[int, ...]) -> CodedVector:
    return CodedVector(coding, decode_coding(coding, shape[0], shape[1]))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
