"""Memory limits checked before a lockstep group is coded: the memory there is, and its KV cache."""

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
