"""`bench.py roofline`: the exact product kernel's multiply-adds per second on the network's shapes."""

from __future__ import annotations

import argparse
import ctypes
import json
import time
from pathlib import Path

from bench.common import save

ROOFLINE_SHAPES = [
    (128, 576, 1536),
    (256, 576, 1536),
    (512, 576, 1536),
    (128, 576, 49152),
    (2048, 576, 1536),
    (2048, 576, 3072),
]
"""(rows, reduction, outputs): decoder steps at batch 64, 128 and 256 (int16 activations = twice as many
int8 rows), the output head, and full-sequence encoder passes."""


MADD_PEAK_SOURCE = Path(__file__).with_name("madd_peak.c")


def instruction_peak(threads: int) -> dict | None:
    """The int16 multiply-adds per second of the CPU's multiply-add instruction alone on ``threads`` threads
    (``madd_peak.c``: registers only, the fastest of three half-second runs), the ceiling of any exact
    product kernel here; None without a C compiler or a vector form."""
    from llmpipe.numerics import native

    built = native.build([MADD_PEAK_SOURCE])
    if built is None:
        return None
    library = ctypes.CDLL(str(built))
    library.madd_peak.argtypes, library.madd_peak.restype = [ctypes.c_int64, ctypes.c_int], ctypes.c_int64
    width = library.madd_width()
    if width == 0:
        return None
    steps, best = 1_000_000, float("inf")
    for _ in range(3):
        while True:
            started = time.perf_counter()
            library.madd_peak(steps, threads)
            seconds = time.perf_counter() - started
            if seconds >= 0.5:
                break
            steps *= 2
        best = min(best, seconds)
    return {"width": width, "gmac_s": steps * library.madd_round() * width * threads / best / 1e9}


def roofline(args: argparse.Namespace) -> None:
    """Matrix-product throughput of this CPU: fp32 GEMM, exact int8 ``torch._int_mm`` and llmpipe's exact
    int16-by-int8 kernel (``NetworkKernels.exact_matmul``, one product per weight where ``_int_mm`` takes two)."""
    import torch

    from llmpipe.engine.integer_ops import kernels_for, pair_rows

    torch.set_num_threads(args.threads)
    kernels = kernels_for(torch.device("cpu"))
    rows = []
    for m, k, n in ROOFLINE_SHAPES:
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8)
        b = torch.randint(-127, 128, (k, n), dtype=torch.int8)
        q = torch.randint(-32639, 32640, (m // 2, k)).float()  # the int16 rows that make m int8 rows
        row: dict = {"m": m, "k": k, "n": n}
        cases = {"int8": (torch._int_mm, a, b), "fp32": (torch.matmul, a.float(), b.float())}
        if kernels is not None:
            ones = torch.ones(m // 2, 1), torch.ones(n)

            def fused(x, pairs, ones=ones):
                return kernels.exact_matmul(x, ones[0], pairs, ones[1], None)

            cases["int16"] = (fused, q, pair_rows(b))
        for name, (product, x, y) in cases.items():
            product(x, y)  # warm-up
            repeats = 3 if name == "int8" else 10  # _int_mm can be slow: 1 G multiply-adds/s without VNNI
            started = time.perf_counter()
            for _ in range(repeats):
                product(x, y)
            seconds = (time.perf_counter() - started) / repeats
            macs = (m // 2 if name == "int16" else m) * k * n
            row[name] = {"ms": 1000 * seconds, "gmac_s": macs / seconds / 1e9}
        print(json.dumps(row), flush=True)
        rows.append(row)
    peak = instruction_peak(args.threads)
    print(json.dumps({"instruction_peak": peak}), flush=True)
    save(args.name, {"kind": "roofline", "model": "-", "threads": args.threads, "rows": rows, "instruction_peak": peak})
