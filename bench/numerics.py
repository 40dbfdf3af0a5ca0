"""`bench.py numerics`: exact against float numerics on the same slices."""

from __future__ import annotations

import argparse

from bench.common import DEFAULT_FILES, compare_settings, save
from llmpipe.models import cache
from llmpipe.pipeline.compress import Compressor


def compare_numerics(args: argparse.Namespace) -> None:
    """The price of exactness: the same slices coded with the exact and the float engine (compression only)."""
    model = cache.load(args.model)
    settings = {
        numerics: lambda data, numerics=numerics: Compressor(model, threads=args.threads, numerics=numerics)
        for numerics in ("exact", "float")
    }
    rows = compare_settings(args, DEFAULT_FILES[:4], settings)
    save(args.name, {"kind": "numerics", "model": model.name, "rows": rows})
