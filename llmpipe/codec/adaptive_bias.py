"""An adaptive bias on the model's tables: each row learns online which symbols the model misjudges there.

Why: a language model's prediction does not move with what it has already
seen in this text beyond its window, and even inside it a small model
under-predicts the names, words and markup a document repeats. One bias per
symbol, added to the model's log-probabilities and trained by online gradient
descent on the code length (Nacrith's "adaptive head"), corrects that cheaply:
on enwik8 it saves about 1% more than the n-gram and match mixer alone.

The model: each row keeps integers ``B(s)`` (units of 2^-16 nat), starting
at 0. Before a symbol, the model's table ``F`` (total at most 2^FREQ_BITS)
becomes

    M(s) = MULTIPLIER[(B(s) + LIMIT) >> 8]    (rnd(2^16 exp(k / 256 - 6)), a table)
    P(s) = (F(s) - 1) * M(s);   Z = sum P(s)
    F'(s) = 1 + floor(P(s) * (budget / Z))    (budget = 2^FREQ_BITS - columns)

and after symbol ``a`` is coded with ``F'`` (total ``T'``), one gradient step
of rate ``RATE`` on ``-log p'(a)``:

    B(s) -= floor(F'(s) * (RATE / T'))   for every s;   B(a) += RATE
    B(s) = min(LIMIT, max(-LIMIT, B(s)))

Exactness: as in ``frequencies``. The multipliers come from 40-digit
decimal arithmetic; ``|B| <= 6`` nats keeps ``M < 2^24.7``, so every ``P(s)``
and ``Z`` are integers below 2^53 (exact in any order); each ``F'`` and each
step is one correctly rounded division and one correctly rounded product,
floored: the same bits on every IEEE machine, and the floors of ``F'`` sum to
at most ``budget``. The compiled kernels (``kernels``) do the same
operations; the torch code here is the reference.
"""

from __future__ import annotations

import decimal
from functools import cache
from typing import NamedTuple

import torch

from llmpipe.codec.frequencies import FREQ_BITS, kernels_for
from llmpipe.numerics.tables import decimal_exp

UNIT_BITS = 16  # B is counted in 2^-16 nat
GRID_SHIFT = 8  # M is looked up on a 1/256 nat grid: B >> 8
MULTIPLIER_BITS = 16
LIMIT_STEPS = 6 * 256  # |B| <= 6 nat: the largest multiplier, 2^16 e^6, stays below 2^24.7
LIMIT = LIMIT_STEPS << GRID_SHIFT
RATE = round(0.2 * (1 << UNIT_BITS))  # the gradient step, 0.2 nat (13107), chosen on enwik8, alice29, book1, news


@cache
def multipliers() -> torch.Tensor:
    """``rnd(2^16 exp(k / 256))`` for ``k = -1536..1536``, float64 integers (index ``k + 1536``)."""
    scale = decimal.Decimal(2) ** MULTIPLIER_BITS
    values = [
        int(
            (scale * decimal_exp(decimal.Decimal(k) / (1 << GRID_SHIFT))).to_integral_value(
                rounding=decimal.ROUND_HALF_EVEN
            )
        )
        for k in range(-LIMIT_STEPS, LIMIT_STEPS + 1)
    ]
    return torch.tensor(values, dtype=torch.float64)


class BiasedRun(NamedTuple):
    """:meth:`AdaptiveBias.run`'s result: the biased tables (n, W), each one's total and its symbol's
    frequency in it (what the history mixer's prediction and update read)."""

    tables: torch.Tensor
    totals: list[float]
    sizes: list[float]


class AdaptiveBias:
    """The biases of a group's rows: ``tables`` before a position, ``learn`` after it, in order."""

    def __init__(self, rows: int, columns: int) -> None:
        self.bias = torch.zeros(rows, columns, dtype=torch.int32)

    def tables(self, freq: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """The biased tables ``F'`` (a new tensor) of the model tables ``freq``, ``freq[k]`` biased by row
        ``rows[k]``'s ``B``."""
        kernels = kernels_for(freq.device)
        if kernels is not None and freq.dtype == torch.float64:
            return kernels.bias_tables(freq, rows, self.bias, multipliers(), LIMIT, self._budget())
        steps = ((self.bias[rows] + LIMIT) >> GRID_SHIFT).long()  # floor(B / 256) + LIMIT_STEPS, never negative
        products = (freq - 1.0).mul_(multipliers()[steps])  # integers below 2^53: exact
        total = products.sum(dim=1, keepdim=True)  # exact sums
        share = torch.full_like(total, self._budget()) / total  # one rounded division (scalar / tensor is not)
        return products.mul_(share).floor_().add_(1.0)

    def learn(self, tables: torch.Tensor, rows: list[int], symbols: list[int]) -> None:
        """One gradient step for each of ``rows``, whose biased table ``tables[k]`` coded ``symbols[k]``."""
        kernels = kernels_for(tables.device)
        if kernels is not None and tables.dtype == torch.float64:
            kernels.bias_learn(tables, rows, symbols, self.bias, RATE, LIMIT)
            return
        total = tables.sum(dim=1, keepdim=True)
        ratio = torch.full_like(total, float(RATE)) / total  # the spec's division, as the kernels do it
        bias = self.bias[rows] - tables.mul(ratio).floor_().to(torch.int32)
        bias[torch.arange(len(rows)), symbols] += RATE
        self.bias[rows] = bias.clamp_(-LIMIT, LIMIT)

    def run(self, row: int, freq: torch.Tensor, symbols: list[int]) -> BiasedRun:
        """Encoder side: the biased tables of consecutive positions of ``row`` whose ``symbols`` are known
        (``freq``: their model tables), learning after each position as the decoder will. With the
        compiled kernels in one call (``bias_run``), the same numbers as a :meth:`tables` then
        :meth:`learn` per position."""
        kernels = kernels_for(freq.device)
        if kernels is not None and freq.dtype == torch.float64:
            found = kernels.bias_run(freq, self.bias[row], symbols, multipliers(), RATE, LIMIT, self._budget())
            return BiasedRun(*found)
        biased = torch.empty_like(freq)
        for i, symbol in enumerate(symbols):
            table = self.tables(freq[i : i + 1], [row])
            self.learn(table, [row], [symbol])
            biased[i] = table[0]
        sizes = biased.gather(1, torch.tensor(symbols)[:, None])[:, 0]
        return BiasedRun(biased, biased.sum(dim=1).tolist(), sizes.tolist())

    def _budget(self) -> float:
        return float((1 << FREQ_BITS) - self.bias.shape[1])
