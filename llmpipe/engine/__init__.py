"""Inference engines: they turn model inputs into logits, which the codec turns into frequency tables.

``exact`` (the default) computes every number in exact integer arithmetic so
archives decode on any machine; ``float`` runs float32, float16 or bfloat16
(optionally with 8-bit weights) and is reproducible only on the machine and
settings recorded in the archive.
"""

from __future__ import annotations

import torch

from llmpipe.defaults import FLOAT_DTYPES
from llmpipe.errors import UsageError

NUMERICS = ("exact", "float")


def usable_device(device: str) -> str:
    """``device`` as "cpu" or "cuda:N"; refuses other kinds and CUDA where there is none."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        parsed = torch.device("meta")  # refused below
    if parsed.type not in ("cpu", "cuda"):
        raise UsageError("--device must be cpu, cuda or cuda:N")
    if parsed.type == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is available here")
    return f"cuda:{parsed.index or 0}"


def create_engine(
    numerics: str,
    model,
    threads: int,
    batch: int,
    device: str = "cpu",
    dtype: str = "float32",
    load_in_8bit: bool = False,
):
    """The engine for ``numerics`` ("exact" or "float") over a loaded model, on ``device`` ("cpu", "cuda[:N]").

    ``dtype`` and ``load_in_8bit`` choose the float engine's weights; the exact
    engine always runs its own int8 weights, so it refuses anything else.
    """
    device = usable_device(device)
    if dtype not in FLOAT_DTYPES:
        raise UsageError(f"unknown dtype {dtype!r} (choose from {', '.join(FLOAT_DTYPES)})")
    if numerics == "exact":
        if dtype != "float32" or load_in_8bit:
            raise UsageError(
                "--dtype and --load-in-8bit choose the float engine's weights (add --numerics float); "
                "exact numerics always run int8 weights"
            )
        from llmpipe.engine.exact_engine import ExactEngine

        return ExactEngine(model, threads, device)
    if numerics == "float":
        from llmpipe.engine.float_engine import FloatEngine

        return FloatEngine(model, threads, batch, dtype, load_in_8bit, device)
    raise UsageError(f"unknown numerics {numerics!r} (choose from {', '.join(NUMERICS)})")
