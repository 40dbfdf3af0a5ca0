"""`bench.py steps` and `step-rows`: the decoder's step time against context length and rows per step."""

from __future__ import annotations

import argparse
import json
import os
import time

from bench.common import save
from llmpipe.models import cache

STEP_LENGTHS = [64, 256, 512, 1024, 2048, 4096, 8192]


def decoder_costs(engine, batch: int, lengths: list[int] = STEP_LENGTHS) -> tuple[dict[int, float], float]:
    """Milliseconds of one lockstep step of ``batch`` rows at each cache length (the network and the
    frequency tables, as ``LockstepSession.step``), and of prefill per row-token."""
    import torch

    from llmpipe.codec.frequencies import frequency_tables
    from llmpipe.tokenization import ESCAPE_SYMBOLS

    network = engine._network
    steps = {}
    with torch.inference_mode():
        for length in lengths:
            kv = network.new_cache(batch, length)
            kv.length = length - 2
            tokens = torch.ones(batch, 1, dtype=torch.long)
            network.forward(tokens, kv)  # warm-up
            times = []
            for _ in range(5):  # the fastest of five: other load only ever adds time
                kv.length = length - 2
                started = time.perf_counter()
                frequency_tables(network.forward(tokens, kv)[:, 0], ESCAPE_SYMBOLS)
                times.append((time.perf_counter() - started) * 1000)
            steps[length] = min(times)
        session = engine.session(batch, 256)
        started = time.perf_counter()
        session.restart([[1] * 256] * batch)  # the decoder's restart, as it runs
        prefill = (time.perf_counter() - started) * 1000 / (batch * 256)
    return steps, prefill


def decoding_steps(args: argparse.Namespace) -> None:
    """One decoding step of 64 rows at several cache lengths, with the compiled kernels and with the torch
    path that runs without a C compiler (``LLMPIPE_NATIVE=0``): same numbers, different speed."""
    from llmpipe.codec import frequencies
    from llmpipe.engine import integer_ops
    from llmpipe.engine.exact_engine import ExactEngine

    model = cache.load(args.model)
    paths = {}
    for path, switch in (("kernels", "1"), ("torch", "0")):
        os.environ["LLMPIPE_NATIVE"] = switch
        integer_ops._checked_kernels.cache_clear()
        frequencies._checked_kernels.cache_clear()
        steps_ms, prefill_ms = decoder_costs(ExactEngine(model, args.threads), 64)
        paths[path] = {"step_ms": steps_ms, "prefill_ms_per_token": prefill_ms}
        print(json.dumps({path: paths[path]}), flush=True)
    os.environ.pop("LLMPIPE_NATIVE")
    integer_ops._checked_kernels.cache_clear()
    frequencies._checked_kernels.cache_clear()
    save(args.name, {"kind": "steps", "model": model.name, "numerics": "exact", "rows": 64, "paths": paths})


ROWS_LENGTHS = [256, 1024, 2048]
"""Cache lengths of the rows-per-step comparison (256 rows at 8,192 positions would need a 24 GB cache)."""


def step_rows(args: argparse.Namespace) -> None:
    """One decoding step (compiled kernels) at 64, 128 and 256 rows: what more rows per step would buy."""
    from llmpipe.engine.exact_engine import ExactEngine

    model = cache.load(args.model)
    batches = {}
    for batch in args.batches:
        steps_ms, prefill_ms = decoder_costs(ExactEngine(model, args.threads), batch, ROWS_LENGTHS)
        batches[batch] = {"step_ms": steps_ms, "prefill_ms_per_token": prefill_ms}
        print(json.dumps({batch: batches[batch]}), flush=True)
    save(args.name, {"kind": "step-rows", "model": model.name, "numerics": "exact", "batches": batches})
