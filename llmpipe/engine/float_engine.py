"""The float32 lockstep engine: bit-exact only against itself on the same machine.

Floating-point results depend on batch shape, thread count, CPU instruction
set and library versions (see ``../shared/GUIDE.md``, "Exact numerics").
So the encoder runs exactly the decoder's schedule: the same rows in the same
batch, one position per step through a preallocated KV cache, the same thread
count; and the archive records a fingerprint of everything else, which the
decoder compares with its own before doing any work.
"""

from __future__ import annotations

import platform

import numpy as np
import torch

from llmpipe.engine.memory import check_kv_budget
from llmpipe.engine.session import LockstepSession
from llmpipe.models.cache import LoadedModel
from llmpipe.models.transformer import Transformer


def numeric_fingerprint(threads: int, batch: int) -> dict:
    """Everything that can change a float32 logit on this machine."""
    return {
        "engine": "float",
        "dtype": "float32",
        "device": "cpu",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
        "threads": threads,
        "batch": batch,
        "torch": torch.__version__,
        "numpy": np.__version__,
    }


class FloatEngine:
    """Runs a loaded model in float32 on the CPU with a fixed thread count."""

    full_sequence = False  # the encoder must replay the decoder's exact schedule

    def __init__(self, model: LoadedModel, threads: int, batch: int) -> None:
        torch.set_num_threads(threads)
        self.threads = threads
        self.batch = batch
        cfg = model.config
        self.max_positions = cfg.max_position_embeddings
        self.kv_bytes_per_position = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4
        self._network = Transformer(cfg, model.weights, torch.float32)

    def numerics(self) -> dict:
        return numeric_fingerprint(self.threads, self.batch)

    def session(self, rows: int, max_len: int) -> LockstepSession:
        """A lockstep group; refuses groups longer than the model's context or larger than the memory limit."""
        check_kv_budget(rows, max_len, self.max_positions, self.kv_bytes_per_position)
        return LockstepSession(self._network, rows, max_len)
