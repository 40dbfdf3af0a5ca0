"""Memory limits of the codec's own state, checked before a group is coded: its rows' history models.

(The KV cache's limit is the engine's: ``engine.memory``.)
"""

from __future__ import annotations

from llmpipe.errors import LlmpipeError

HISTORY_BYTES_PER_SYMBOL = 1600
"""Memory of the mixer's history model per symbol (n-gram contexts, match index): 1,565 measured on enwik8."""
BIAS_BYTES_PER_SYMBOL = 4 + 8
"""A row's adaptive bias per symbol of the alphabet (not of the text): its int32 bias and its float64 biased table."""
HISTORY_LIMIT = 8 << 30
"""Largest memory the history models of one group may take (bytes)."""
HISTORY_SYMBOLS = HISTORY_LIMIT // HISTORY_BYTES_PER_SYMBOL
"""The symbols that fit in it: about 5.4 million (an 8 MB window of the densest text a row may hold)."""


def check_history_budget(symbols: int) -> None:
    """Refuse a group whose rows hold more symbols than their history models may remember."""
    if symbols > HISTORY_SYMBOLS:
        needed = symbols * HISTORY_BYTES_PER_SYMBOL
        raise LlmpipeError(
            f"{symbols} symbols in one group need {needed / 2**30:.1f} GiB for the mixer's history, over the "
            f"{HISTORY_LIMIT >> 30} GiB limit (use a smaller --batch or --chunk-size, or --mixer none)"
        )
