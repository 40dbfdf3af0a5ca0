"""`bench.py roundtrip`: every corpus file compressed and decompressed, byte for byte."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from bench.common import CORPUS, ROOT, save


def roundtrip(args: argparse.Namespace) -> None:
    """`llmpipe -c | llmpipe -d` through the real CLI for every corpus file, sliced to --bytes."""
    launcher = [sys.executable, str(ROOT / "bin" / "llmpipe")]
    rows = []
    files = sorted(p for p in CORPUS.rglob("*") if p.is_file() and p.name not in ("MANIFEST.md", "SHA256SUMS"))
    if not files:
        raise SystemExit("../shared/corpus not available")
    for path in files:
        data = path.read_bytes()[: args.bytes]
        started = time.perf_counter()
        options = ["--chunk-size", str(args.chunk_size), "--batch", str(args.batch)]
        packed = subprocess.run([*launcher, "-c", *options], input=data, capture_output=True)
        restored = subprocess.run([*launcher, "-d"], input=packed.stdout, capture_output=True)
        row = {
            "file": str(path.relative_to(CORPUS)),
            "bytes": len(data),
            "ok": packed.returncode == 0 and restored.returncode == 0 and restored.stdout == data,
            "bpb": 8 * len(packed.stdout) / len(data),
            "seconds": time.perf_counter() - started,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    save(
        args.name,
        {"kind": "roundtrip", "model": "default", "numerics": "exact", "chunk_size": args.chunk_size, "rows": rows},
    )
