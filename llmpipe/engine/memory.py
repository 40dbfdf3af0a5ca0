"""Memory limits checked before a lockstep group is coded: its KV cache and its rows' history models."""

from __future__ import annotations

import os

from llmpipe.errors import LlmpipeError


def available_memory(device: str) -> int:
    """Memory a run may take now: the GPU's free memory, or the host's available memory (Linux
    ``MemAvailable``; elsewhere all physical memory)."""
    if device != "cpu":
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_kv_budget(rows: int, max_len: int, max_positions: int, bytes_per_position: int, limit: int) -> None:
    """Refuse groups longer than the model's context or whose key/value cache exceeds ``limit`` bytes (an
    engine's limit is the memory its device had left once the weights were in): a clear message instead
    of running out of memory, also for hostile archives."""
    if max_len > max_positions:
        raise LlmpipeError(f"{max_len} symbols in one block exceed the model's context of {max_positions}")
    needed = rows * max_len * bytes_per_position
    if needed > limit:
        raise LlmpipeError(
            f"{rows} rows x {max_len} positions need {needed / 2**30:.1f} GiB of KV cache, "
            f"over the {limit / 2**30:.1f} GiB available (use a smaller --batch or --chunk-size)"
        )


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
