"""`bench.py context`: row length x context window x overlap, in bits and in modelled decoding time."""

from __future__ import annotations

import argparse
import io
import json

from bench.common import CORPUS, save
from bench.steps import decoder_costs
from llmpipe.models import cache
from llmpipe.pipeline.compress import Compressor

CONTEXT_GRID = [  # (row length, context window, overlap); window 0: the whole row
    (2048, 0, 0),
    (8192, 0, 0),
    (16384, 1024, 256),
    (16384, 2048, 512),
    (16384, 2048, 1024),
    (16384, 4096, 1024),
    (32768, 2048, 512),
    (32768, 4096, 1024),
]

CONTEXT_BATCHES = (32, 64)  # the decoder's step is timed at these batches


def context_grid(args: argparse.Namespace) -> None:
    """Row length x context window x overlap: bits per byte measured, decoder speed modelled from measured steps.

    Rows are measured on ``--slices`` slices of ``--bytes`` bytes spread evenly
    over the file (the start of a file is not typical of the rest), each slice
    cut into rows of the setting's length. Decoding the whole file takes most
    of an hour per setting here, so the decoder's time for the whole file is
    modelled: one lockstep step is timed at several cache lengths and two
    batches (interpolated between), a restart at the measured prefill cost per
    token, and each setting's schedule summed over the rows the file makes.
    """
    from llmpipe.engine.exact_engine import ExactEngine

    model = cache.load(args.model)
    whole = (CORPUS / args.file).read_bytes()
    starts = [k * (len(whole) - args.bytes) // max(1, args.slices - 1) for k in range(args.slices)]
    engine = ExactEngine(model, args.threads)
    costs = {batch: decoder_costs(engine, batch) for batch in CONTEXT_BATCHES}
    print(json.dumps(costs), flush=True)
    rows = []
    for chunk_size, window, overlap in CONTEXT_GRID:
        ideal_bits, archive_bytes, symbols, seconds = 0.0, 0, 0, 0.0
        for start in starts:
            compressor = Compressor(
                model,
                chunk_size=chunk_size,
                batch=args.bytes // chunk_size,
                threads=args.threads,
                context=window,
                overlap=overlap,
                steer="none",
            )
            sink = io.BytesIO()
            stats = compressor.compress_stream(io.BytesIO(whole[start : start + args.bytes]), sink)
            ideal_bits += stats.ideal_bits + 8 * (args.bytes - stats.llm_input_bytes)
            archive_bytes += len(sink.getvalue())
            symbols += stats.llm_symbols
            seconds += stats.seconds
        sampled = args.bytes * len(starts)
        decode_seconds = _modelled_file_seconds(len(whole), chunk_size, symbols / sampled, window, overlap, costs)
        row = {
            "chunk_size": chunk_size,
            "window": window,
            "overlap": overlap,
            "bytes": sampled,
            "bpb": 8 * archive_bytes / sampled,
            "ideal_bpb": ideal_bits / sampled,
            "compress_kb_s": sampled / 1024 / seconds,
            "modelled_decompress_kb_s": len(whole) / 1024 / decode_seconds,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    save(
        args.name,
        {
            "kind": "context",
            "model": model.name,
            "numerics": "exact",
            "file": args.file,
            "file_bytes": len(whole),
            "slices": len(starts),
            "slice_bytes": args.bytes,
            "costs": {str(batch): {"step_ms": s, "prefill_ms_per_token": p} for batch, (s, p) in costs.items()},
            "rows": rows,
        },
    )


def _modelled_file_seconds(
    size: int, chunk_size: int, tokens_per_byte: float, window: int, overlap: int, costs: dict
) -> float:
    """Decoder time for a file of ``size`` bytes cut into rows of ``chunk_size``, in lockstep passes of at
    most 64 rows: each pass's steps at its batch and cache lengths, and its restarts' prefill."""
    import numpy as np

    from llmpipe.codec.context import ContextWindow

    context = ContextWindow(window, overlap)
    rows = -(-size // chunk_size)
    total = 0.0
    for first_row in range(0, rows, 64):
        batch = min(64, rows - first_row)
        steps_ms, prefill_ms = _costs_at(batch, costs)
        lengths = sorted(steps_ms)
        tokens = int(min(chunk_size, size - first_row * chunk_size) * tokens_per_byte)
        starts = context.starts(tokens)
        for k, (a, b) in enumerate(zip(starts, [*starts[1:], tokens], strict=True)):
            first = 1 if k == 0 else context.overlap + 1  # context length at the segment's first step
            cache_lengths = np.arange(first, first + b - a)
            total += float(np.interp(cache_lengths, lengths, [steps_ms[n] for n in lengths]).sum())
            if k:
                total += context.overlap * prefill_ms * batch
    return total / 1000


def _costs_at(batch: int, costs: dict) -> tuple[dict[int, float], float]:
    """Step times and prefill per row-token at ``batch`` rows, interpolated linearly between the measured
    batches (the nearest one outside them)."""
    low, high = min(costs), max(costs)
    share = min(1.0, max(0.0, (batch - low) / (high - low)))
    (steps_low, prefill_low), (steps_high, prefill_high) = costs[low], costs[high]
    steps = {n: steps_low[n] + share * (steps_high[n] - steps_low[n]) for n in steps_low}
    per_token = (prefill_low * low + share * (prefill_high * high - prefill_low * low)) / batch
    return steps, per_token
