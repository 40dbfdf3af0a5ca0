"""`bench.py mixing`: the mixer's versions (and none) on the same slices."""

from __future__ import annotations

import argparse

from bench.common import DEFAULT_FILES, compare_settings, save
from llmpipe.codec import mixer
from llmpipe.defaults import DEFAULT_CHUNK_SIZE
from llmpipe.models import cache
from llmpipe.pipeline.compress import Compressor

MIXING_FILES = DEFAULT_FILES[:5]


def compare_mixing(args: argparse.Namespace) -> None:
    """What the mixer buys: the same slices coded with it (``on``), with mixer version 1 (``no bias``: the
    history experts without the adaptive bias) and without it (``off``), compression only.

    The slice is cut into rows of the default chunk size, as a long input is
    (a shorter one gets rows of at least 8 KB, where the history has less to give).
    """
    model = cache.load(args.model)

    def compressor(data: bytes, version: int) -> Compressor:
        rows = max(1, -(-len(data) // DEFAULT_CHUNK_SIZE))
        made = Compressor(model, batch=rows, threads=args.threads, mixing=version > 0)
        made.windows.mixer_version = version  # version 1: as llmpipe 0.4 wrote, without the adaptive bias
        return made

    versions = (("on", mixer.VERSION), ("no bias", 1), ("off", 0))
    settings = {label: lambda data, v=version: compressor(data, v) for label, version in versions}
    rows = compare_settings(args, MIXING_FILES, settings)
    payload = {"kind": "mixing", "model": model.name, "numerics": "exact", "chunk_size": DEFAULT_CHUNK_SIZE}
    save(args.name, {**payload, "rows": rows})
