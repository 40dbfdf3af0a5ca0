"""Memory limits the engines enforce before allocating a lockstep group's KV cache."""

from __future__ import annotations

from llmpipe.errors import LlmpipeError

KV_CACHE_LIMIT = 12 << 30
"""Largest key/value cache one group may allocate (bytes): bounds memory on hostile archives too."""


def check_kv_budget(rows: int, max_len: int, max_positions: int, bytes_per_position: int) -> None:
    """Refuse groups longer than the model's context or larger than :data:`KV_CACHE_LIMIT`."""
    if max_len > max_positions:
        raise LlmpipeError(f"{max_len} symbols in one block exceed the model's context of {max_positions}")
    needed = rows * max_len * bytes_per_position
    if needed > KV_CACHE_LIMIT:
        raise LlmpipeError(
            f"{rows} rows x {max_len} positions need {needed / 2**30:.1f} GiB of KV cache, "
            f"over the {KV_CACHE_LIMIT >> 30} GiB limit (use a smaller --batch or --chunk-size)"
        )
