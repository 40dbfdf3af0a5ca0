"""The float lockstep engine: bit-exact only against itself on the same machine and settings.

Floating-point results depend on batch shape, thread count, CPU instruction
set or GPU, library versions, the dtype and how weights were quantised (see
``../shared/GUIDE.md``, "Exact numerics"). So the encoder runs exactly the
decoder's schedule: the same rows in the same batch, one position per step
through a preallocated KV cache, the same thread count; and the archive
records a fingerprint of everything else, which the decoder compares with its
own before doing any work.
"""

from __future__ import annotations

import platform

import numpy as np
import torch

from llmpipe.engine.memory import available_memory, check_kv_budget
from llmpipe.engine.protocol import Prompt, prompt_rows
from llmpipe.engine.session import LockstepSession
from llmpipe.models.cache import LoadedModel
from llmpipe.models.linear import INT8_THRESHOLD, bitsandbytes_version
from llmpipe.models.transformer import KVCache, Transformer

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def numeric_fingerprint(
    threads: int, batch: int, dtype: str = "float32", load_in_8bit: bool = False, device: str = "cpu"
) -> dict:
    """Everything that can change a float logit on this machine.

    A float32 run on the CPU records exactly what llmpipe 0.2 recorded, so its
    archives still decode; other settings add their keys.
    """
    record = {
        "engine": "float",
        "dtype": dtype,
        "device": "cpu" if device == "cpu" else "cuda",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
        "threads": threads,
        "batch": batch,
        "torch": torch.__version__,
        "numpy": np.__version__,
    }
    if device != "cpu":
        props = torch.cuda.get_device_properties(torch.device(device))
        record["gpu"] = f"{props.name} sm_{props.major}{props.minor}"
        record["cuda"] = torch.version.cuda
    if load_in_8bit:
        record["load_in_8bit"] = True
        record["int8_threshold"] = INT8_THRESHOLD
        record["bitsandbytes"] = bitsandbytes_version()
    return record


class FloatEngine:
    """Runs a loaded model in ``dtype`` (optionally with 8-bit weights) on ``device`` with a fixed thread count."""

    full_sequence = False  # the encoder must replay the decoder's exact schedule

    def __init__(
        self,
        model: LoadedModel,
        threads: int,
        batch: int,
        dtype: str = "float32",
        load_in_8bit: bool = False,
        device: str = "cpu",
    ) -> None:
        torch.set_num_threads(threads)
        if device != "cpu":  # no TF32 or reduced-precision sums behind the recorded dtype's back
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        self._fingerprint = numeric_fingerprint(threads, batch, dtype, load_in_8bit, device)
        cfg = model.config
        self.max_positions = cfg.max_position_embeddings
        self.kv_bytes_per_position = KVCache.bytes_per_position(cfg, DTYPES[dtype])
        self._network = Transformer(cfg, model.weights, DTYPES[dtype], device, load_in_8bit)
        self.kv_limit = available_memory(device)  # what the device has left with the weights in

    def numerics(self) -> dict:
        return dict(self._fingerprint)

    def set_prompt(self, prompt: Prompt | None) -> None:
        """Steer every row with ``prompt`` (None: no prompt); its positions come out of the model's context."""
        self._network.set_prompt(prompt_rows(prompt, self._network.embed))
        self.max_positions = self._network.config.max_position_embeddings - (prompt.length if prompt else 0)

    def session(self, rows: int, max_len: int) -> LockstepSession:
        """A lockstep group; refuses groups longer than the model's context or larger than the memory limit."""
        check_kv_budget(rows, max_len, self.max_positions, self.kv_bytes_per_position, self.kv_limit)
        return LockstepSession(self._network, rows, max_len)
