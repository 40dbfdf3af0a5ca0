"""The codec's compiled kernels (``kernels.c``): typed calls into them.

The codec's work per position is a pass over a whole table of the
vocabulary's size (about 49,000 float64 integers): building it from the
logits, biasing it, mixing it with the history's predictions, finding a
symbol's place in it. In torch each is several passes with temporaries;
here each is one pass per row, with the same IEEE operations, so the same
bits. ``frequencies.kernels_for`` builds them through ``numerics.native`` and
checks them on a known answer before any use.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from llmpipe.numerics.native import COUNT, FLAGS, INT64, POINTER, build, load

SOURCES = (Path(__file__).with_name("kernels.c"),)
_INT32, _DOUBLE = ctypes.c_int32, ctypes.c_double
SIGNATURES = {
    "frequency_tables": ([POINTER, ctypes.c_float, POINTER, INT64, _DOUBLE, POINTER] + [INT64] * 3 + [COUNT], None),
    "mixed_totals": ([POINTER] * 6 + [INT64] * 2 + [COUNT], None),
    "find_mixed": ([POINTER] * 11 + [INT64] * 2 + [COUNT], None),
    "code_mixed": ([POINTER] * 10 + [INT64] * 2 + [COUNT], None),
    "bias_tables": ([POINTER] * 4 + [_INT32, _DOUBLE, POINTER] + [INT64] * 2 + [COUNT], None),
    "bias_learn": ([POINTER] * 4 + [_INT32] * 2 + [INT64] * 2 + [COUNT], None),
    "bias_run": ([POINTER] * 4 + [_INT32] * 2 + [_DOUBLE] + [POINTER] * 3 + [INT64] * 2 + [COUNT], None),
}


class _Mixture:
    """The mixed tables' description as ``kernels.c`` reads it: row indices, LM weights, and the masses as
    one ascending (symbol, value) list per row, concatenated with each row's start."""

    def __init__(self, rows: list[int], lm_weights: list[float], masses: list[dict[int, float]]) -> None:
        ordered = [sorted(row.items()) for row in masses]
        self.index = torch.tensor(rows, dtype=torch.int64)
        self.weights = torch.tensor(lm_weights, dtype=torch.float64)
        self.start = torch.tensor([0] + [len(row) for row in ordered], dtype=torch.int64).cumsum(0)
        self.symbols = torch.tensor([v for row in ordered for v, _ in row] or [0], dtype=torch.int64)
        self.values = torch.tensor([m for row in ordered for _, m in row] or [0.0], dtype=torch.float64)
        self._freq: torch.Tensor | None = None  # the contiguous tables last pointed at, kept alive

    def pointers(self, freq: torch.Tensor) -> tuple[int, ...]:
        """``freq``, index, weights, starts, symbols, values, in ``find_mixed``'s order."""
        self._freq = freq.contiguous()
        return tuple(
            x.data_ptr() for x in (self._freq, self.index, self.weights, self.start, self.symbols, self.values)
        )


class CodingKernels:
    """Typed calls into the compiled library, on torch's current number of threads (CPU tensors)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._library = library

    def frequency_tables(
        self, logits: torch.Tensor, grid: float, exp: torch.Tensor, budget: float, extra: int
    ) -> torch.Tensor:
        """``frequencies.frequency_tables`` of contiguous float32 ``logits`` (B, V) with the float64
        ``exp`` table -> (B, V + extra) float64."""
        rows, vocab = logits.shape
        freq = torch.empty(rows, vocab + extra, dtype=torch.float64)
        pointers = (logits.data_ptr(), grid, exp.data_ptr(), len(exp), budget, freq.data_ptr())
        self._library.frequency_tables(*pointers, rows, vocab, vocab + extra, torch.get_num_threads())
        return freq

    def bias_tables(
        self,
        freq: torch.Tensor,
        rows: list[int],
        bias: torch.Tensor,
        multipliers: torch.Tensor,
        limit: int,
        budget: float,
    ) -> torch.Tensor:
        """``adaptive_bias.AdaptiveBias.tables``: float64 ``freq`` (n, W), ``freq[k]`` biased by the int32
        ``bias`` row ``rows[k]`` -> (n, W) float64."""
        freq = freq.contiguous()
        n, width = freq.shape
        out = torch.empty(n, width, dtype=torch.float64)
        index = torch.tensor(rows, dtype=torch.int64)
        pointers = (freq.data_ptr(), index.data_ptr(), bias.data_ptr(), multipliers.data_ptr(), limit, budget)
        self._library.bias_tables(*pointers, out.data_ptr(), n, width, torch.get_num_threads())
        return out

    def bias_learn(
        self, tables: torch.Tensor, rows: list[int], symbols: list[int], bias: torch.Tensor, rate: int, limit: int
    ) -> None:
        """``adaptive_bias.AdaptiveBias.learn``: updates the int32 ``bias`` rows ``rows`` in place."""
        tables = tables.contiguous()
        index = torch.tensor(rows, dtype=torch.int64)
        coded = torch.tensor(symbols, dtype=torch.int64)
        pointers = (tables.data_ptr(), index.data_ptr(), coded.data_ptr(), bias.data_ptr(), rate, limit)
        self._library.bias_learn(*pointers, len(rows), tables.shape[1], torch.get_num_threads())

    def bias_run(
        self,
        freq: torch.Tensor,
        bias: torch.Tensor,
        symbols: list[int],
        multipliers: torch.Tensor,
        rate: int,
        limit: int,
        budget: float,
    ) -> tuple[torch.Tensor, list[float], list[float]]:
        """``adaptive_bias.AdaptiveBias.run``: the biased tables of ``freq`` (n, W) float64, one position
        after the other, learning into ``bias`` (one row's int32 (W,), contiguous, updated in place) after
        each; also each table's total and its symbol's frequency."""
        freq = freq.contiguous()
        n, width = freq.shape
        out = torch.empty(n, width, dtype=torch.float64)
        found = torch.empty(2, n, dtype=torch.float64)  # totals, sizes
        coded = torch.tensor(symbols, dtype=torch.int64)
        pointers = (freq.data_ptr(), bias.data_ptr(), multipliers.data_ptr(), coded.data_ptr(), rate, limit, budget)
        outputs = (out.data_ptr(), found[0].data_ptr(), found[1].data_ptr())
        self._library.bias_run(*pointers, *outputs, n, width, torch.get_num_threads())
        totals, sizes = found.tolist()
        return out, totals, sizes

    def code_mixed(
        self, freq: torch.Tensor, lm_weights: list[float], masses: list[dict[int, float]], symbols: list[int]
    ) -> tuple[list[int], list[int], list[int]]:
        """``frequencies.code_positions`` of ``symbols`` in ``mixer.mix_tables``' mixed rows of ``freq``
        (n, W) float64, without building them: the starts, sizes and totals."""
        mixture = _Mixture(list(range(len(symbols))), lm_weights, masses)
        coded = torch.tensor(symbols, dtype=torch.int64)
        found = torch.empty(3, len(symbols), dtype=torch.float64)  # starts, sizes, totals
        pointers = (*mixture.pointers(freq), coded.data_ptr(), *(x.data_ptr() for x in found))
        self._library.code_mixed(*pointers, len(symbols), freq.shape[1], torch.get_num_threads())
        starts, sizes, totals = found.to(torch.int64).tolist()
        return starts, sizes, totals

    def row_totals(self, freq: torch.Tensor, rows: list[int]) -> list[float]:
        """The sums of ``rows`` of ``freq`` (B, V) float64 integers: ``mixed_totals`` unmixed."""
        return self._mixed_totals(freq, _Mixture(rows, [1.0] * len(rows), [{}] * len(rows))).tolist()

    def mixed_tables_search(
        self,
        freq: torch.Tensor,
        rows: list[int],
        lm_weights: list[float],
        masses: list[dict[int, float]],
        targets_for: Callable[[list[int]], list[int]],
    ) -> tuple[list[int], list[int], list[int], list[float]]:
        """``mixer.decode_symbols`` (which see) in two passes over ``freq`` (B, V) float64: the mixed rows'
        totals, then, for the targets ``targets_for(totals)``, the symbols, their starts and sizes, and
        their frequencies in ``freq``."""
        mixture = _Mixture(rows, lm_weights, masses)
        totals = self._mixed_totals(freq, mixture)
        targets = torch.tensor(targets_for(totals.to(torch.int64).tolist()), dtype=torch.float64)
        n, width = len(rows), freq.shape[1]
        symbols = torch.empty(n, dtype=torch.int64)
        found = torch.empty(3, n, dtype=torch.float64)  # starts, sizes, LM sizes
        pointers = (*mixture.pointers(freq), targets.data_ptr(), symbols.data_ptr(), *(x.data_ptr() for x in found))
        self._library.find_mixed(*pointers, n, width, torch.get_num_threads())
        whole = found[:2].to(torch.int64).tolist()
        return symbols.tolist(), whole[0], whole[1], found[2].tolist()

    def _mixed_totals(self, freq: torch.Tensor, mixture: _Mixture) -> torch.Tensor:
        """The totals of the mixed rows of ``freq`` (``kernels.c``'s ``mixed_totals``), float64 (rows,)."""
        totals = torch.empty(len(mixture.index), dtype=torch.float64)
        freq_at, index, weights, start, _, values = mixture.pointers(freq)
        arguments = (freq_at, index, weights, start, values, totals.data_ptr(), len(mixture.index), freq.shape[1])
        self._library.mixed_totals(*arguments, torch.get_num_threads())
        return totals


def compiled(flags: Sequence[str] = FLAGS) -> CodingKernels | None:
    """The kernels built with ``flags`` (none without a compiler), not yet checked: see ``frequencies``."""
    library = load(build(SOURCES, (), flags), SIGNATURES)
    return CodingKernels(library) if library is not None else None
