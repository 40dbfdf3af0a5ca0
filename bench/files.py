"""`bench.py run` and `sweep`: llmpipe against the baselines on corpus files, and across chunk sizes."""

from __future__ import annotations

import argparse
import json

from bench.common import CORPUS, DEFAULT_FILES, baseline_bpb, corpus_slices, measure, save
from llmpipe.models import cache
from llmpipe.pipeline.compress import Compressor
from llmpipe.pipeline.decompress import Decompressor


def run(args: argparse.Namespace) -> None:
    model = cache.load(args.model)
    compressor = Compressor(
        model,
        chunk_size=args.chunk_size,
        batch=args.batch,
        threads=args.threads,
        numerics=args.numerics,
        context=args.context,
        overlap=args.overlap,
    )
    decompressor = None if args.compress_only else Decompressor(model, threads=args.threads)
    rows = []
    for relative, data in corpus_slices(args.files or DEFAULT_FILES, args.bytes):
        row = {"file": relative, **measure(compressor, decompressor, data), "baselines": baseline_bpb(data)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    save(
        args.name,
        {
            "kind": "files",
            "model": model.name,
            "numerics": args.numerics,
            "chunk_size": args.chunk_size,
            "batch": args.batch,
            "context": compressor.context.record(),
            "rows": rows,
        },
    )


def sweep(args: argparse.Namespace) -> None:
    model = cache.load(args.model)
    decompressor = Decompressor(model)
    data = (CORPUS / args.file).read_bytes()[: args.bytes]
    rows = []
    for chunk_size in args.chunk_sizes:
        batch = max(1, args.bytes // chunk_size)  # one lockstep group holds the whole input
        compressor = Compressor(model, chunk_size=chunk_size, batch=batch, threads=args.threads)
        row = {"chunk_size": chunk_size, "batch": batch, **measure(compressor, decompressor, data)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    save(args.name, {"kind": "sweep", "model": model.name, "numerics": "exact", "file": args.file, "rows": rows})
