"""Mixing the language model with an online model of the row's own history.

Why: the language model sees only its context window and copies exact
repeats imperfectly (XML markup, repeated names, table rows), where classic
context-mixing compressors are strong. So each row also keeps

- token n-gram counts of orders 1, 2, 3, 4 and 6 over the symbols coded so far;
- a match model: after ``MATCH_MIN`` symbols that occurred before, it predicts
  the symbol that followed them last time, for as long as it keeps being right;

and the coder uses the linear mixture ``p(s) = w_0 p_LM(s) + sum_i w_i q_i(s)``.
Each *context bucket* (how often each n-gram context was seen, how long the
match is) has its own weights, adapted after every symbol by one online EM
step: ``w_i += (w_i q_i(a) / p(a) - w_i) / 32``. An expert with nothing to
say (a context never seen, no match) lends its weight to the language model.

Exactness: counts and positions are integers; the weights are float64 and
change only through ``+ - x /``, which IEEE 754 rounds correctly on every
machine, in the fixed order written here (FORMAT.md section 5). The mixed
table is built from floors of such products. Encoder and decoder make the same
calls in the same order, so they hold the same weights at every position, and
an archive stays as portable as its engine.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmpipe.codec.frequencies import code_positions, find_symbols, kernels_for
from llmpipe.errors import ArchiveError

NAME = "ngram-match"
VERSIONS = (1, 2)
"""1: the experts below mixed with the model's tables; 2: the same, on tables first biased by
``adaptive_bias`` (written by this llmpipe; 1 is still decoded)."""
VERSION = VERSIONS[-1]
ORDERS = (1, 2, 3, 4, 6)
MATCH_MIN = 4
RATE = 1 / 32  # EM step size; a power of two, so scaling by it is exact
WEIGHT_FLOOR = 2.0**-16  # no weight reaches 0: every expert can come back, and p(a) > 0
INITIAL_EXPERT_WEIGHT = 1 / 32
MAX_MATCH_BUCKET = 15


def record(version: int) -> dict | None:
    """The header's ``mixer`` field for a version of :data:`VERSIONS`, or 0 for none."""
    return {"name": NAME, "version": version} if version else None


def check_record(value: object) -> int:
    """The mixer version a header's ``mixer`` field (absent means None) asks for, 0 for none; unknown
    ones are refused."""
    if value is None:
        return 0
    for version in VERSIONS:
        if value == record(version):
            return version
    known = " or ".join(repr(record(v)) for v in VERSIONS)
    raise ArchiveError(f"archive uses mixer {value!r}; this llmpipe implements {known}")


def _count_bucket(n: int) -> int:
    return 0 if n == 0 else 1 if n == 1 else 2 if n < 4 else 3 if n < 16 else 4


@dataclass
class Prediction:
    """What the history says before one symbol: the table's ingredients and what the update needs."""

    total: float  # T, the LM table's total
    lm_weight: float  # w_0 plus the weight of every silent expert
    masses: dict[int, float]  # symbol -> the integer mass the experts add to its frequency
    weights: list[float]  # the bucket's weights (w_0, w_1, ...), updated in place
    experts: list[tuple[dict[int, int], int] | None]  # each expert's counts and their total, None if silent


class RowHistory:
    """The history model of one row; ``predict`` then ``update`` once per symbol, in order."""

    def __init__(self) -> None:
        self.symbols: list[int] = []
        self._contexts: list[dict[tuple[int, ...], tuple[dict[int, int], list[int]]]] = [{} for _ in ORDERS]
        self._last_seen: dict[tuple[int, ...], int] = {}  # MATCH_MIN symbols -> index after their last occurrence
        self._match: int | None = None  # index of the symbol the match predicts next
        self._match_length = 0
        self._weights: dict[tuple[int, ...], list[float]] = {}

    def predict(self, total: float) -> Prediction:
        """The mixture's ingredients for the next symbol, given the LM table's total ``T``."""
        t = len(self.symbols)
        experts: list[tuple[dict[int, int], int] | None] = []
        bucket: list[int] = []
        for order, contexts in zip(ORDERS, self._contexts, strict=True):
            entry = contexts.get(tuple(self.symbols[t - order :])) if t >= order else None
            experts.append((entry[0], entry[1][0]) if entry else None)
            bucket.append(_count_bucket(entry[1][0]) if entry else 0)
        if self._match is None:
            experts.append(None)
            bucket.append(0)
        else:
            experts.append(({self.symbols[self._match]: 1}, 1))
            bucket.append(1 + min(self._match_length, MAX_MATCH_BUCKET - 1))
        key = tuple(bucket)
        weights = self._weights.get(key)
        if weights is None:
            weights = [1 - len(experts) * INITIAL_EXPERT_WEIGHT] + [INITIAL_EXPERT_WEIGHT] * len(experts)
            self._weights[key] = weights
        lm_weight = weights[0]
        masses: dict[int, float] = {}
        for weight, expert in zip(weights[1:], experts, strict=True):
            if expert is None:
                lm_weight += weight
                continue
            counts, n = expert
            unit = weight * total / n
            for symbol, count in counts.items():
                masses[symbol] = masses.get(symbol, 0.0) + math.floor(count * unit)
        return Prediction(total, lm_weight, masses, weights, experts)

    def update(self, prediction: Prediction, symbol: int, lm_size: float) -> None:
        """Learn from the coded ``symbol``, whose frequency in the LM table was ``lm_size``."""
        weights = prediction.weights
        lm_probability = lm_size / prediction.total  # one correctly rounded division of two exact integers
        q = [lm_probability] + [lm_probability if e is None else e[0].get(symbol, 0) / e[1] for e in prediction.experts]
        mixed = weights[0] * q[0]
        for weight, qi in zip(weights[1:], q[1:], strict=True):
            mixed += weight * qi
        responsibilities = [weight * qi / mixed for weight, qi in zip(weights, q, strict=True)]
        for i, r in enumerate(responsibilities):
            weights[i] = max(WEIGHT_FLOOR, weights[i] + (r - weights[i]) * RATE)
        self._learn(symbol)

    def _learn(self, symbol: int) -> None:
        t = len(self.symbols)
        for order, contexts in zip(ORDERS, self._contexts, strict=True):
            if t >= order:
                counts, total = contexts.setdefault(tuple(self.symbols[t - order :]), ({}, [0]))
                counts[symbol] = counts.get(symbol, 0) + 1
                total[0] += 1
        self.symbols.append(symbol)
        if self._match is not None and self.symbols[self._match] == symbol:
            self._match += 1
            self._match_length += 1
        else:
            self._match, self._match_length = None, 0
        if len(self.symbols) >= MATCH_MIN:
            recent = tuple(self.symbols[-MATCH_MIN:])
            if self._match is None and recent in self._last_seen:
                self._match = self._last_seen[recent]
            self._last_seen[recent] = len(self.symbols)

    def predict_run(self, symbols: list[int], totals: list[float], sizes: list[float]) -> list[Prediction]:
        """Encoder side: the predictions for consecutive positions whose ``symbols`` are known, learning as it
        goes; ``totals`` are their LM tables' totals and ``sizes`` each symbol's frequency there."""
        predictions = []
        for symbol, total, size in zip(symbols, totals, sizes, strict=True):
            prediction = self.predict(total)
            predictions.append(prediction)
            self.update(prediction, symbol, size)
        return predictions


def code_run(
    freq: torch.Tensor, symbols: list[int], predictions: list[Prediction]
) -> tuple[list[int], list[int], list[int]]:
    """Encoder side: each known symbol's start and size in the mixed table of its position (the LM tables
    ``freq`` mixed with ``predictions``) and the table's total; with the compiled kernels in one pass per
    position, without building the mixed tables (``freq`` is left as it is then, and mixed in place
    otherwise)."""
    kernels = kernels_for(freq.device)
    if kernels is not None and freq.dtype == torch.float64:
        return kernels.code_mixed(freq, [p.lm_weight for p in predictions], [p.masses for p in predictions], symbols)
    return code_positions(mix_tables(freq, predictions), torch.tensor(symbols))


def mix_step(freq: torch.Tensor, histories: list[RowHistory], symbols: list[int]) -> torch.Tensor:
    """Encoder side, one lockstep position of several rows: their mixed tables (``freq`` mixed in place)."""
    predictions = predict_step(freq.sum(dim=1).tolist(), histories)
    learn_step(histories, predictions, symbols, lm_sizes(freq, symbols))
    return mix_tables(freq, predictions)


def predict_step(totals: list[float], histories: list[RowHistory]) -> list[Prediction]:
    """Every row's prediction for one lockstep position, given the totals of its LM table."""
    return [h.predict(total) for h, total in zip(histories, totals, strict=True)]


def row_totals(freq: torch.Tensor, rows: list[int]) -> list[float]:
    """The totals of ``rows`` of the LM tables ``freq`` (in one pass of the compiled kernel where there is one)."""
    kernels = kernels_for(freq.device)
    if kernels is not None and freq.dtype == torch.float64:
        return kernels.row_totals(freq, rows)
    return freq[rows].sum(dim=1).tolist()


def decode_symbols(
    freq: torch.Tensor,
    rows: list[int],
    predictions: list[Prediction] | None,
    targets_for: Callable[[list[int]], list[int]],
) -> tuple[list[int], list[int], list[int], list[float]]:
    """Decoder side, one lockstep position: a symbol for each of ``rows`` of the LM tables ``freq``, found
    in the mixed tables of ``predictions`` (one per row; None: in the LM tables as they are).

    Returns the symbols, their starts and sizes in the tables searched, and
    their frequencies in the LM tables (what :func:`learn_step` needs).
    ``targets_for`` is ``frequencies.find_symbols``'s. With the compiled
    kernels (``kernels``) the mixed tables are never built: two passes
    over ``freq`` give the same numbers as :func:`mix_tables` then ``find_symbols``.
    """
    kernels = kernels_for(freq.device)
    if kernels is not None and freq.dtype == torch.float64:
        weights = [1.0] * len(rows) if predictions is None else [p.lm_weight for p in predictions]
        masses = [{}] * len(rows) if predictions is None else [p.masses for p in predictions]
        return kernels.mixed_tables_search(freq, rows, weights, masses, targets_for)
    table = freq[rows]  # a copy: mixing it in place leaves freq as it was
    symbols, starts, sizes = find_symbols(table if predictions is None else mix_tables(table, predictions), targets_for)
    return symbols, starts, sizes, freq[rows, symbols].tolist()


def learn_step(
    histories: list[RowHistory], predictions: list[Prediction], symbols: list[int], sizes: list[float]
) -> None:
    """After one lockstep position: every row's history learns its symbol and the symbol's LM frequency."""
    for history, prediction, symbol, size in zip(histories, predictions, symbols, sizes, strict=True):
        history.update(prediction, symbol, size)


def lm_sizes(freq: torch.Tensor, symbols: list[int]) -> list[float]:
    """``F(a)``: each row's symbol's frequency in the LM table of that row."""
    return freq.gather(1, torch.tensor(symbols)[:, None])[:, 0].tolist()


def mix_tables(freq: torch.Tensor, predictions: list[Prediction]) -> torch.Tensor:
    """Turns the LM tables ``F`` (float64 integers, totals ``T``) into the mixed ones, in place, and returns them.

    Row ``r`` becomes ``max(1, floor(F(s) * w)) + masses(s)``, where ``w`` is
    the LM's weight (with the silent experts') and ``masses(s) = sum_i
    floor(c_i(s) * (w_i * T / n_i))`` (``RowHistory.predict``) with ``c_i``
    expert ``i``'s counts and ``n_i`` their sum: the mixture scaled to ``T``.
    Every symbol keeps a frequency of at least 1 and the total stays below
    ``T * (sum of weights) + V``, about ``T``: within the range coder's 2^32.
    """
    lm_weights = torch.tensor([p.lm_weight for p in predictions], dtype=torch.float64)[:, None]
    mixed = freq.mul_(lm_weights).floor_().clamp_(min=1.0)  # in place: a fresh table would cost more than this
    rows = [r for r, p in enumerate(predictions) for _ in p.masses]
    columns = [symbol for p in predictions for symbol in p.masses]
    values = [mass for p in predictions for mass in p.masses.values()]
    if rows:  # integer sums: exact in any order
        mixed.index_put_(
            (torch.tensor(rows), torch.tensor(columns)), torch.tensor(values, dtype=torch.float64), accumulate=True
        )
    return mixed
