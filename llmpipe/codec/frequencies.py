"""Turn a row of logits into the integer frequency table the range coder uses.

Every symbol gets a frequency of at least 1 (so any token can be coded, even
one the model thinks impossible) and the table sums to at most
``2**FREQ_BITS``. The rest of the mass is shared in proportion to the softmax,
rounded down.

The softmax itself is integer-valued arithmetic in float64: the distance of
each logit from the row maximum is rounded to a 1/256 grid and looked up in
an exp table scaled to 2^24 (``numerics.tables.exp_table``); the denominator
``Z`` is a sum of integers below 2^53, so exact in any order; each frequency
is ``1 + floor(e * (budget / Z))``, with ``e * (budget / Z)`` two correctly
rounded IEEE operations. So identical logits give identical tables on every
machine. The rounding of ``budget / Z`` and of the product exceed the exact
value by at most 2^-52 relatively, so the floors still sum to at most
``budget`` (their excess is below 1). Tables are float64 tensors of
integers (exact below 2^53): cumulative sums of them are exact too.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch

from llmpipe.codec import kernels as compiled_kernels
from llmpipe.codec.kernels import CodingKernels
from llmpipe.numerics.native import enabled
from llmpipe.numerics.tables import exp_table, lookup

FREQ_BITS = 28  # frequency total; loses < V / 2^28 of probability mass to the +1 floors
LOGIT_GRID = 256  # logit resolution: 1/256 nat, at most 0.2% relative error in a probability
EXP_BITS = 24

_EXP = torch.from_numpy(exp_table(LOGIT_GRID, EXP_BITS)).to(torch.float64)  # integers: exact


def frequency_tables(logits: torch.Tensor, extra_symbols: int, freq_bits: int = FREQ_BITS) -> torch.Tensor:
    """Integer frequencies ``(B, V + extra)`` (float64 holding integers) for float32 ``logits`` ``(B, V)``.

    The ``extra_symbols`` (escapes) get frequency 1 each; every row sums to
    at most ``2**freq_bits``. On the CPU in one pass of the compiled kernel when
    there is one (``kernels``), else :func:`frequency_tables_torch`: the same bits.
    """
    kernels = kernels_for(logits.device)
    if kernels is None or logits.dtype != torch.float32 or not logits.shape[0]:
        return frequency_tables_torch(logits, extra_symbols, freq_bits)
    budget = float((1 << freq_bits) - logits.shape[1] - extra_symbols)
    return kernels.frequency_tables(logits.contiguous(), float(LOGIT_GRID), _EXP, budget, extra_symbols)


def frequency_tables_torch(logits: torch.Tensor, extra_symbols: int, freq_bits: int = FREQ_BITS) -> torch.Tensor:
    """:func:`frequency_tables` in torch operations (any device); the compiled kernel (``kernels``)
    does the same operations in one pass per row."""
    rows, vocab = logits.shape
    budget = float((1 << freq_bits) - vocab - extra_symbols)
    top = logits.amax(dim=1, keepdim=True)
    steps = torch.round_((top - logits).mul_(float(LOGIT_GRID))).clamp_(max=len(_EXP) - 1)
    e = lookup(_EXP, steps)  # (B, V), integers <= 2^24
    total = e.sum(dim=1, keepdim=True)  # >= 2^24 (the maximum itself): never 0
    share = torch.full_like(total, budget) / total
    freq = torch.ones(rows, vocab + extra_symbols, dtype=torch.float64)
    freq[:, :vocab] += torch.floor_(e.mul_(share))
    return freq


def code_positions(freq: torch.Tensor, symbols: torch.Tensor) -> tuple[list[int], list[int], list[int]]:
    """For rows of ``freq`` and one symbol per row: the symbol's (start, size) and the row total, as ints
    (in one pass per row of the compiled kernel where there is one)."""
    kernels = kernels_for(freq.device)
    if kernels is not None and freq.dtype == torch.float64:
        rows = len(symbols)
        return kernels.code_mixed(freq, [1.0] * rows, [{}] * rows, symbols.tolist())  # weight 1: the table itself
    return code_positions_torch(freq, symbols)


def code_positions_torch(freq: torch.Tensor, symbols: torch.Tensor) -> tuple[list[int], list[int], list[int]]:
    """:func:`code_positions` in torch operations (any device)."""
    size = freq.gather(1, symbols[:, None])[:, 0]
    start = [int(row[:symbol].sum()) for row, symbol in zip(freq, symbols.tolist(), strict=True)]  # no (B, V) temporary
    total = freq.sum(dim=1)
    return start, size.to(torch.int64).tolist(), total.to(torch.int64).tolist()


def find_symbols(
    freq: torch.Tensor, targets_for: Callable[[list[int]], list[int]]
) -> tuple[list[int], list[int], list[int]]:
    """Decode one symbol per row of ``freq``: returns the symbols, their starts and sizes.

    ``targets_for(totals)`` gets each row's total and returns the count the
    range decoder is looking for in that row.
    """
    cumulative = freq.cumsum(dim=1)  # exact: integers below 2^53
    targets = targets_for(cumulative[:, -1].to(torch.int64).tolist())
    wanted = torch.tensor(targets, dtype=torch.float64)[:, None]
    symbols = torch.searchsorted(cumulative, wanted, right=True)  # (B, 1)
    size = freq.gather(1, symbols)
    start = cumulative.gather(1, symbols) - size
    return symbols[:, 0].tolist(), start[:, 0].to(torch.int64).tolist(), size[:, 0].to(torch.int64).tolist()


@cache
def _checked_kernels() -> CodingKernels | None:
    """The codec's compiled kernels when they build and agree with the torch path here (once a process)."""
    kernels = compiled_kernels.compiled() if enabled() else None
    return kernels if kernels is not None and kernels_agree(kernels) else None


def kernels_for(device: torch.device) -> CodingKernels | None:
    """The codec's kernels for tensors on ``device``, or None (use the torch path): the frequency tables',
    the mixer's (``mixer``) and the adaptive bias's (``adaptive_bias``)."""
    return _checked_kernels() if device.type == "cpu" else None


def kernels_agree(kernels: CodingKernels) -> bool:
    """Do the compiled tables and their coding give the torch path's bits (a flat row, a peaked row with
    logits past the exp table's end, and random rows at several scales, escapes included)? (The mixer's and
    the bias's kernels are tested against their torch paths in the test suite, at every vector width.)"""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 333, generator=generator) * torch.tensor([[0.0], [1.0], [4.0], [16.0], [64.0], [1e4]])
    budget = float((1 << FREQ_BITS) - logits.shape[1] - 7)
    tables = kernels.frequency_tables(logits, float(LOGIT_GRID), _EXP, budget, 7)
    reference = frequency_tables_torch(logits, 7)
    symbols = torch.randint(0, 340, (6,), generator=generator)
    coded = kernels.code_mixed(reference, [1.0] * 6, [{}] * 6, symbols.tolist())
    return torch.equal(tables, reference) and coded == code_positions_torch(reference, symbols)
