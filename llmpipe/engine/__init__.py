"""Inference engines: they turn model inputs into frequency tables for the coder.

``exact`` (the default) computes every number in exact integer arithmetic so
archives decode on any machine; ``float`` runs float32 and is reproducible
only on the machine and settings recorded in the archive.
"""

from __future__ import annotations

import torch

from llmpipe.errors import UsageError

NUMERICS = ("exact", "float")


def create_engine(numerics: str, model, threads: int, batch: int, device: str = "cpu"):
    """The engine for ``numerics`` ("exact" or "float") over a loaded model, on ``device`` ("cpu", "cuda[:N]")."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        parsed = torch.device("meta")  # refused below
    if parsed.type not in ("cpu", "cuda"):
        raise UsageError("--device must be cpu, cuda or cuda:N")
    device = "cpu" if parsed.type == "cpu" else str(parsed)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is available here")
    if numerics == "exact":
        from llmpipe.engine.exact_engine import ExactEngine

        return ExactEngine(model, threads, device)
    if numerics == "float":
        if device != "cpu":
            raise UsageError("--numerics float runs on the CPU only (exact numerics run on CUDA too)")
        from llmpipe.engine.float_engine import FloatEngine

        return FloatEngine(model, threads, batch)
    raise UsageError(f"unknown numerics {numerics!r} (choose from {', '.join(NUMERICS)})")
