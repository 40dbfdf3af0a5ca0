"""`bench.py scale-out`: one process against local workers on the same input, and what that says for enwik9.

One run compresses and decompresses the same slice three ways: one process
with all the threads (decoding up to 64 rows together), ``--workers N`` with
a thread each, and (with ``--ray``) a Ray cluster of N one-thread actors
started on 127.0.0.1 for the run; workers decode a block (``--batch`` rows)
each. It checks the archives are identical, measures KB/s and the driver's
own CPU seconds per segment (reading, checking, writing; the workers' time
is theirs), and projects enwik9 (10^9 bytes) on 8 and 64 workers from the
measured per-worker rate: segments are independent, so N workers code N
segments at once, plus the driver's time.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import corpus_slices, save
from llmpipe.defaults import resolve_threads
from llmpipe.pipeline.compress import Compressor
from llmpipe.pipeline.decompress import Decompressor
from llmpipe.scale.launch import compressor_on_workers, decompressor_on_workers

ENWIK9 = 10**9
PROJECTED_WORKERS = (8, 64)


def _driver_cpu() -> float:
    """CPU seconds of this process (the driver and its threads), not of its worker processes."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _run(label: str, compressing: Callable, decompressing: Callable, data: bytes) -> tuple[dict, bytes]:
    """Compress, then decompress, ``data`` with what each callable makes: a (driver, pool) pair, the pool
    None for one process. Times and driver CPU count the coding only, the workers already started."""
    compressor, pool = compressing()
    try:
        sink = io.BytesIO()
        cpu = _driver_cpu()
        stats = compressor.compress_stream(io.BytesIO(data), sink)
        compress_cpu = _driver_cpu() - cpu
    finally:
        if pool:
            pool.close()
    archive = sink.getvalue()
    decompressor, pool = decompressing()
    try:
        out = io.BytesIO()
        started, cpu = time.perf_counter(), _driver_cpu()
        decode = decompressor.decompress_stream(io.BytesIO(archive), out)
        decompress_cpu = _driver_cpu() - cpu
    finally:
        if pool:
            pool.close()
    if out.getvalue() != data:
        raise SystemExit(f"{label}: round trip FAILED")
    row = {
        "setup": label,
        "segments": stats.blocks,
        "archive_bytes": len(archive),
        "compress_kb_s": len(data) / 1024 / stats.seconds,
        "decompress_kb_s": len(data) / 1024 / (time.perf_counter() - started),
        "driver_cpu_s_per_segment": {
            "compress": compress_cpu / stats.blocks,
            "decompress": decompress_cpu / decode.blocks,
        },
    }
    print(json.dumps(row), flush=True)
    return row, archive


def _ray_head(threads: int) -> tuple[str, Path]:
    """Start a Ray head on 127.0.0.1 for this run; its address and the ``ray`` command that stops it (its
    temporary directory under /tmp stays for Ray's logs)."""
    import socket

    ray = Path(sys.executable).parent / "ray"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    command = [str(ray), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", f"--num-cpus={threads}"]
    command += ["--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"]
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    return f"127.0.0.1:{port}", ray


def scale_out(args: argparse.Namespace) -> None:
    threads = resolve_threads(args.threads)
    options = {"model": args.model, "chunk_size": args.chunk_size, "batch": args.batch}
    (relative, data), *_ = corpus_slices([args.file], args.bytes)
    single = Compressor(args.model, chunk_size=args.chunk_size, batch=args.batch, threads=threads)
    rows = []
    row, archive = _run(
        f"1 process, {threads} threads",
        lambda: (single, None),
        lambda: (Decompressor(args.model, threads=threads), None),
        data,
    )
    rows.append(row)
    setups = [("workers", None)] + ([("ray", "start")] if args.ray else [])
    for kind, address in setups:
        ray_command = None
        if address == "start":
            address, ray_command = _ray_head(threads)
        try:
            on = {"threads": 1} if kind == "ray" else {"threads": threads}
            # one pool at a time (a cluster of `threads` CPUs holds one), and each block (args.batch rows) a
            # decoding job of its own, so that every worker has one
            label = f"{threads} {'Ray actors' if kind == 'ray' else 'worker processes'}, 1 thread each"
            row, other = _run(
                label,
                lambda on=on, address=address: compressor_on_workers({**options, **on}, threads, address),
                lambda on=on, address=address: decompressor_on_workers(
                    {"model": args.model, "batch": args.batch, **on}, threads, address
                ),
                data,
            )
            row["identical"] = other == archive
            rows.append(row)
        finally:
            if ray_command:
                subprocess.run([str(ray_command), "stop", "--force"], capture_output=True)
    per_worker = rows[1]["compress_kb_s"] / threads
    per_worker_decode = rows[1]["decompress_kb_s"] / threads
    projection = {
        str(n): {
            "compress_hours": ENWIK9 / 1024 / (per_worker * n) / 3600,
            "decompress_hours": ENWIK9 / 1024 / (per_worker_decode * n) / 3600,
        }
        for n in PROJECTED_WORKERS
    }
    save(
        args.name,
        {
            "kind": "scale-out",
            "model": single.model.name,
            "numerics": "exact",
            "file": relative,
            "bytes": len(data),
            "chunk_size": args.chunk_size,
            "batch": args.batch,
            "rows": rows,
            "per_worker_kb_s": {"compress": per_worker, "decompress": per_worker_decode},
            "enwik9": projection,
        },
    )


def section(run_data: dict, table_head) -> list[str]:
    """The scale-out section of BENCHMARKS.md."""
    lines = [
        f"`{run_data['file']}`, first {run_data['bytes']} bytes, chunk size {run_data['chunk_size']}, batch "
        f"{run_data['batch']}: segments (windows) of {run_data['chunk_size'] * run_data['batch']} bytes. "
        "Driver CPU is the driving process's own CPU seconds per segment (reading, dispatching, checking and "
        "writing), the workers' time not included."
    ]
    lines += table_head(
        "| setup | segments | archive bytes | identical | compress KB/s | decompress KB/s | "
        "driver CPU s/segment (compress, decompress) |"
    )
    for r in run_data["rows"]:
        same = {True: "yes", False: "**no**", None: "(reference)"}[r.get("identical")]
        cpu = r["driver_cpu_s_per_segment"]
        driver = f"{cpu['compress']:.3f}, {cpu['decompress']:.3f}"
        lines.append(
            f"| {r['setup']} | {r['segments']} | {r['archive_bytes']} | {same} | {r['compress_kb_s']:.2f} | "
            f"{r['decompress_kb_s']:.2f} | {driver if 'identical' in r else f'({driver}: all the coding)'} |"
        )
    rate = run_data["per_worker_kb_s"]
    lines += [
        "",
        f"Projected for enwik9 (10^9 bytes) from the measured rate of one one-thread worker here "
        f"({rate['compress']:.2f} KB/s compressing, {rate['decompress']:.2f} decompressing), segments being "
        "independent (each worker its own memory; the driver's share above is negligible at these rates):",
        "",
        "| workers | compress hours | decompress hours |",
        "|---|---|---|",
    ]
    for n, p in run_data["enwik9"].items():
        lines.append(f"| {n} | {p['compress_hours']:.1f} | {p['decompress_hours']:.1f} |")
    return lines
