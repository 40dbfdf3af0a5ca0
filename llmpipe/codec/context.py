"""Which model inputs the prediction of each symbol sees: the context window (FORMAT.md section 5)."""

from __future__ import annotations

from dataclasses import dataclass

from llmpipe.format.fields import MAX_CONTEXT


@dataclass(frozen=True)
class ContextWindow:
    """Which model inputs the prediction of each symbol sees (FORMAT.md section 5).

    With ``window == 0`` symbol ``i`` sees inputs ``x_0..x_i`` (the whole
    chunk so far; ``x_0`` is the prime token). Otherwise the chunk is cut
    into segments starting at ``a_0 = 0``, ``a_1 = window``,
    ``a_{k+1} = a_k + window - overlap``; in segment ``k >= 1`` symbol ``i``
    sees the prime token then ``x_{a_k - overlap + 1}..x_i``. No context is
    longer than ``window`` inputs.
    """

    window: int = 0
    overlap: int = 0

    def __post_init__(self) -> None:
        """The bounds of FORMAT.md section 5, the one place they are checked (they also bound the KV cache)."""
        if self.window == 0 and self.overlap == 0:
            return
        if not 3 <= self.window <= MAX_CONTEXT or not 1 <= self.overlap <= self.window - 2:
            raise ValueError(
                f"context window {self.window} with overlap {self.overlap}: the window must be 0 "
                f"or 3..{MAX_CONTEXT} tokens and the overlap 1..window-2"
            )

    def starts(self, length: int) -> list[int]:
        """``a_0, a_1, ...`` below ``length``."""
        if not self.window:
            return [0]
        starts = [0]
        nxt = self.window
        while nxt < length:
            starts.append(nxt)
            nxt += self.window - self.overlap
        return starts

    def longest_context(self, length: int) -> int:
        return min(length, self.window) if self.window else length

    def record(self) -> dict:
        return {"window": self.window, "overlap": self.overlap}
