"""The decoder's schedule, shared by both engines: rows advanced one position per step through a KV cache."""

from __future__ import annotations

from typing import Protocol

import torch

PREFILL_TOKENS = 1024
"""Tokens (rows x positions) one prefill pass handles."""


class CachedModel(Protocol):
    """A network with a preallocated KV cache: ``models.transformer.Transformer`` (float) or
    ``engine.exact_transformer.ExactTransformer``."""

    def new_cache(self, batch: int, max_len: int) -> object: ...

    def forward(self, tokens: torch.Tensor, cache) -> torch.Tensor: ...

    def prefill(self, tokens: torch.Tensor, cache) -> None: ...


class LockstepSession:
    """``rows`` sequences advanced together one position per :meth:`step`."""

    def __init__(self, model: CachedModel, rows: int, max_len: int) -> None:
        self._model = model
        self._cache = model.new_cache(rows, max_len)

    def step(self, inputs: list[int]) -> torch.Tensor:
        """Feed one token per row; return the logits of every row's next position, (rows, V) float32."""
        tokens = torch.tensor(inputs, dtype=torch.long).unsqueeze(1)  # (B, 1)
        with torch.inference_mode():
            logits = self._model.forward(tokens, self._cache)  # (B, 1, V)
        return logits[:, 0]

    def restart(self, prefixes: list[list[int]]) -> None:
        """Empty the cache (but for the steering prompt) and fill it with ``prefixes`` (one per row, equal
        lengths): a re-primed window.

        The prefixes go in slices of positions so that one pass holds about
        :data:`PREFILL_TOKENS` tokens (bigger passes run slower, from the
        size of their temporaries).
        """
        self._cache.reset()
        tokens = torch.tensor(prefixes, dtype=torch.long)  # (B, T)
        width = max(1, PREFILL_TOKENS // len(prefixes))
        with torch.inference_mode():
            for a in range(0, tokens.shape[1], width):
                self._model.prefill(tokens[:, a : a + width], self._cache)
