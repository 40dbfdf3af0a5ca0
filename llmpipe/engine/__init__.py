"""Inference engines: they turn model inputs into frequency tables for the coder.

``exact`` (the default) computes every number in exact integer arithmetic so
archives decode on any machine; ``float`` runs float32 and is reproducible
only on the machine and settings recorded in the archive.
"""

from __future__ import annotations

from llmpipe.errors import UsageError

NUMERICS = ("exact", "float")


def create_engine(numerics: str, model, threads: int, batch: int):
    """The engine for ``numerics`` ("exact" or "float") over a loaded model."""
    if numerics == "exact":
        from llmpipe.engine.exact_engine import ExactEngine

        return ExactEngine(model, threads)
    if numerics == "float":
        from llmpipe.engine.float_engine import FloatEngine

        return FloatEngine(model, threads, batch)
    raise UsageError(f"unknown numerics {numerics!r} (choose from {', '.join(NUMERICS)})")
