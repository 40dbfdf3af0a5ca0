"""The exact engine: portable archives, and an encoder that scores whole chunks at once.

Because every logit is computed exactly (``exact_transformer``), the encoder does
not have to replay the decoder's schedule: it scores all positions of a chunk
in one full-sequence pass (many times faster than one position per step),
any rows together, while the decoder steps through the KV cache in whatever
batch it likes. The int8 weights are derived once and kept in the model's
cache directory next to the float weights, in the layout the compiled products
read (``integer_ops.pair_rows``): on the CPU the engine runs on the file's
mapped pages, so its weights are in memory once, shared by every llmpipe
process using them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from llmpipe.engine.exact_transformer import NUMERICS_VERSION, ExactKVCache, ExactTransformer
from llmpipe.engine.exact_weights import prepare_exact_weights
from llmpipe.engine.memory import available_memory, check_kv_budget
from llmpipe.engine.protocol import Prompt, prompt_rows
from llmpipe.engine.session import LockstepSession
from llmpipe.models.cache import LazyWeights, LoadedModel, weights_hash

TOKENS_PER_PASS = 1024
"""Positions one full-sequence pass handles together (rows x length): bounds the encoder's memory."""
HEAD_SLICE = 64
"""Positions whose logits are computed and handed on at a time (the coder turns each into a table of
V + 256 float64 values). Small on purpose: 64 tables (25 MB for a 49k vocabulary) come from reused heap
memory, while 512 (200 MB) are fresh pages on every allocation; measured, compression took 30% longer
with 512."""


def _exact_weights(model: LoadedModel) -> Mapping[str, torch.Tensor]:
    """The prepared int8 weights, from the model cache or derived now (and stored when the cache is writable).

    Derived one matmul at a time from the lazily read float weights, so
    preparing needs the int8 weights plus one float32 matmul's temporaries,
    never a float copy of the model. The stored file carries the SHA-256 of
    its tensors and is checked on every load (tensor by tensor): a damaged
    copy would silently make archives that decode nowhere else, so it is
    derived again instead.
    """
    path = Path(model.directory) / f"exact-v{NUMERICS_VERSION}-pairs.safetensors"
    for older in ("", "-kn"):  # the same weights laid out (N, K) by llmpipe 0.2, (K, N) until 2026-12
        with contextlib.suppress(OSError):
            Path(model.directory, f"exact-v{NUMERICS_VERSION}{older}.safetensors").unlink(missing_ok=True)
    if path.exists():
        stored = LazyWeights(path)
        if stored.metadata().get("sha256") == weights_hash(stored):
            return stored
    weights = prepare_exact_weights(model.config, model.weights)
    try:
        partial = path.with_suffix(".partial")
        save_file(weights, str(partial), metadata={"sha256": weights_hash(weights)})
        partial.replace(path)
    except OSError:
        return weights  # a read-only cache still works, it just prepares again next time
    del weights
    return LazyWeights(path)  # the engine takes each tensor from the file as it builds (no second copy)


class ExactEngine:
    """Runs a loaded model with exact integer numerics on ``device`` (the CPU unless asked otherwise)."""

    full_sequence = True

    def __init__(self, model: LoadedModel, threads: int, device: str = "cpu") -> None:
        torch.set_num_threads(threads)
        cfg = model.config
        self.max_positions = cfg.max_position_embeddings
        self.kv_bytes_per_position = ExactKVCache.bytes_per_position(cfg)
        self._network = ExactTransformer(cfg, _exact_weights(model), device)
        self.kv_limit = available_memory(device)  # what the device has left with the weights in

    def numerics(self) -> dict:
        """The header's numerics record: no machine details, since they do not matter."""
        return {"engine": "exact", "version": NUMERICS_VERSION}

    def set_prompt(self, prompt: Prompt | None) -> None:
        """Steer every row with ``prompt`` (None: no prompt); its positions come out of the model's context."""
        self._network.set_prompt(prompt_rows(prompt, self._network.embed))
        self.max_positions = self._network.config.max_position_embeddings - (prompt.length if prompt else 0)

    def session(self, rows: int, max_len: int) -> LockstepSession:
        check_kv_budget(rows, max_len, self.max_positions, self.kv_bytes_per_position, self.kv_limit)
        return LockstepSession(self._network, rows, max_len)

    def scores(self, inputs: list[list[int]], skips: list[int]) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Score every position of every row in full-sequence passes.

        ``inputs[r]`` is the model input of row ``r`` (the prime token, then
        symbols); its first ``skips[r]`` positions are context only. Yields
        ``(row, first, logits)`` with ``logits`` (n, V) float32 those of
        consecutive scored positions from ``skips[r] + first``, in row order.
        """
        r = 0
        while r < len(inputs):
            together = max(1, TOKENS_PER_PASS // max(len(inputs[r]), 1))
            batch = range(r, min(r + together, len(inputs)))
            width = max(len(inputs[i]) for i in batch)
            padded = [inputs[i] + [inputs[i][-1]] * (width - len(inputs[i])) for i in batch]
            check_kv_budget(len(batch), width, self.max_positions, self.kv_bytes_per_position, self.kv_limit)
            with torch.inference_mode():
                cache = self._network.new_cache(len(batch), width)
                normed = self._network.hidden(torch.tensor(padded, dtype=torch.long), cache)
                for j, i in enumerate(batch):
                    n = len(inputs[i])
                    for a in range(skips[i], n, HEAD_SLICE):
                        b = min(n, a + HEAD_SLICE)
                        part = slice(j * width + a, j * width + b)
                        yield i, a - skips[i], self._network.logits(normed.select(part))
            r += len(batch)
