"""What an engine is to the layers above it: the coder asks for logits, the pipeline sets a prompt.

Two engines implement it (``exact_engine.ExactEngine``, ``float_engine.FloatEngine``).
The engine knows nothing of frequency tables, archives or steering: it turns
model inputs into float32 logits, one row per position, and holds a prompt
given as model tokens or embedding rows (anything shaped like :class:`Prompt`,
such as ``steering.prompt.SteeringPrompt``) before every row.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np
import torch


class Prompt(Protocol):
    """A prompt as the engine needs it: model ``tokens`` (a text) or ``vectors`` (P, C) float32 embedding
    rows (virtual tokens; then ``tokens`` is empty)."""

    tokens: Sequence[int]
    vectors: np.ndarray | None

    @property
    def length(self) -> int: ...


class Session(Protocol):
    """Rows advanced together one position per step through a KV cache (``session.LockstepSession``)."""

    def step(self, inputs: list[int]) -> torch.Tensor:
        """Feed one model input per row; the logits of every row's next position, (rows, V) float32."""
        ...

    def restart(self, prefixes: list[list[int]]) -> None:
        """Empty the cache (but for the prompt) and fill it with ``prefixes`` (one per row, equal lengths)."""
        ...


class Engine(Protocol):
    """A network on a device with its numerics and memory limits."""

    full_sequence: bool
    """True where a position's logits do not depend on the batch or schedule (exact numerics): then the
    encoder may score whole rows at once through :meth:`scores`."""
    max_positions: int
    """Positions a row may use after the prompt."""
    kv_bytes_per_position: int
    kv_limit: int
    """Bytes of KV cache the device can hold (with the weights in)."""

    def numerics(self) -> dict:
        """The archive header's numerics record."""
        ...

    def set_prompt(self, prompt: Prompt | None) -> None:
        """Put ``prompt`` before every row from now on (None: no prompt)."""
        ...

    def session(self, rows: int, max_len: int) -> Session: ...

    def scores(self, inputs: list[list[int]], skips: list[int]) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Only where ``full_sequence``: the logits of every position, see ``ExactEngine.scores``."""
        ...


def prompt_rows(prompt: Prompt | None, embed: torch.Tensor) -> torch.Tensor | None:
    """The prompt as embedding rows (P, C) in ``embed``'s dtype and device: the text's token rows, or the
    virtual tokens' vectors."""
    if prompt is None:
        return None
    if prompt.vectors is None:
        return embed[torch.tensor(prompt.tokens, device=embed.device)]
    return torch.from_numpy(prompt.vectors).to(embed.device, embed.dtype)
