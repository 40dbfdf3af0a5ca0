"""`bench.py throughput`: compression and decompression speed at the defaults, where the time goes, and how
close the network's matrix products come to what this CPU's product kernel does on large shapes.

Each file is compressed and decompressed at each thread count with the default settings (``--steer auto``
included), the archive checked against the input. A profile times every call into the engine's compiled kernels
and the coder by kind (wrapping them for the run: a microsecond or so per call, included in the totals); *Python
and the rest* is what is left of the wall time (glue, torch's own small operations, tokenising, zstd). A
decoding step runs all its layers in one compiled call (``decode_layers``), which times its own products,
attention and norms for the profile. The *roofline* is the product kernel the engine uses
(``NetworkKernels.exact_matmul`` or ``torch._int_mm`` with its combining pass, whichever
``integer_ops.fused_products_win`` picked), timed in the same run on an encoder pass's shape; *of roofline* is
the network's useful products (one multiply-add of an int16 activation by an int8 weight per weight and token:
``products_per_token``) at the measured tokens per second, as a fraction of it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import shlex
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator

import torch

from bench.common import corpus_slices
from bench.roofline import instruction_peak
from llmpipe.codec import mixer
from llmpipe.codec.kernels import CodingKernels
from llmpipe.codec.range_coder import RangeDecoder, RangeEncoder
from llmpipe.engine import integer_ops
from llmpipe.engine.integer_ops import ACT_MAX, int8_products
from llmpipe.engine.kernels import NetworkKernels
from llmpipe.models import cache
from llmpipe.models.config import ModelConfig
from llmpipe.pipeline.compress import Compressor
from llmpipe.pipeline.decompress import Decompressor

PARTS = {
    "products": (
        "NetworkKernels.exact_matmul",
        "NetworkKernels.combine_products",
        "NetworkKernels.split_bytes",
        "integer_ops.int8_matmul",
    ),
    "attention": ("NetworkKernels.attention", "NetworkKernels.prepare_qkv"),
    "norms, activations": (
        "NetworkKernels.rms_norm_quantize",
        "NetworkKernels.quantize_rows",
        "NetworkKernels.activation",
    ),
    "frequency tables": ("CodingKernels.frequency_tables",),
    "bias and mixed tables": (
        "CodingKernels.bias_run",
        "CodingKernels.bias_tables",
        "CodingKernels.bias_learn",
        "CodingKernels.code_mixed",
        "CodingKernels.mixed_tables_search",
        "CodingKernels.row_totals",
    ),
    "mixer (Python)": ("RowHistory.predict", "RowHistory.update"),
    "range coder": ("RangeEncoder.encode", "RangeDecoder.target", "RangeDecoder.consume"),
    "steering decision": ("Compressor.steer_on",),
}
"""What the profile times, by part: methods of these classes (and the int8 product of ``integer_ops``)."""
OWNERS = {
    "NetworkKernels": NetworkKernels,
    "CodingKernels": CodingKernels,
    "RowHistory": mixer.RowHistory,
    "RangeEncoder": RangeEncoder,
    "RangeDecoder": RangeDecoder,
    "Compressor": Compressor,
    "integer_ops": integer_ops,
}
STEP_PARTS = ("products", "attention", "norms, activations")
"""The parts ``NetworkKernels.decode_layers`` times inside a decoding step, in the order of its ``seconds``."""
REST = "Python and the rest"
ROOFLINE_SHAPE = (2048, 576, 1536)
"""An encoder pass's product: 2,048 positions by a SmolLM2-sized gate."""


def products_per_token(config: ModelConfig) -> int:
    """Multiply-adds of the network's matrix products per token: every weight once (the attention's own
    products over the cache come on top and depend on the context)."""
    hidden, head = config.hidden_size, config.head_dim
    qkv = hidden * (config.num_attention_heads + 2 * config.num_key_value_heads) * head
    mlp = hidden * config.intermediate_size * (3 if config.gated_mlp else 2)
    out = config.num_attention_heads * head * hidden
    return config.num_hidden_layers * (qkv + out + mlp) + hidden * config.vocab_size


@contextlib.contextmanager
def profiled() -> Iterator[dict[str, float]]:
    """Inside: the seconds spent in each part of :data:`PARTS`, accumulated into the yielded dict."""
    seconds: dict[str, float] = defaultdict(float)
    saved = []

    def timed(part: str) -> Callable[[Callable], Callable]:
        def wrap(function: Callable) -> Callable:
            def wrapper(*args, **kwargs):
                started = time.perf_counter()
                try:
                    return function(*args, **kwargs)
                finally:
                    seconds[part] += time.perf_counter() - started

            return wrapper

        return wrap

    def timed_step(function: Callable) -> Callable:
        """``decode_layers`` with its ``seconds`` asked for, added to :data:`STEP_PARTS`."""

        def wrapper(*args, **kwargs):
            spent = torch.zeros(len(STEP_PARTS), dtype=torch.float64)
            try:
                return function(*args, **kwargs, seconds=spent)
            finally:
                for part, value in zip(STEP_PARTS, spent.tolist(), strict=True):
                    seconds[part] += value

        return wrapper

    patches = [(name, timed(part)) for part, names in PARTS.items() for name in names]
    for name, wrap in [*patches, ("NetworkKernels.decode_layers", timed_step)]:
        owner_name, method = name.split(".")
        owner = OWNERS[owner_name]
        original = owner.__dict__[method]
        saved.append((owner, method, original))
        setattr(owner, method, wrap(original))
    try:
        yield seconds
    finally:
        for owner, method, original in saved:
            setattr(owner, method, original)


def roofline_rate(threads: int) -> tuple[str, float]:
    """The engine's product kernel on :data:`ROOFLINE_SHAPE` (best of five): its name and multiply-adds per
    second (int16 activations by int8 weights)."""
    torch.set_num_threads(threads)
    kernels = integer_ops.kernels_for(torch.device("cpu"))
    m, k, n = ROOFLINE_SHAPE
    generator = torch.Generator().manual_seed(0)
    q = torch.randint(-ACT_MAX, ACT_MAX + 1, (m, k), generator=generator).float()
    weight = torch.randint(-127, 128, (k, n), generator=generator, dtype=torch.int8)
    row_scale, scale = torch.ones(m, 1), torch.ones(n)
    if kernels is not None and integer_ops.fused_products_win(kernels):
        pairs = integer_ops.pair_rows(weight)
        name, product = "exact_matmul", lambda: kernels.exact_matmul(q, row_scale, pairs, scale, None)
    else:
        name, product = "torch._int_mm", lambda: int8_products(q, weight)
    product()
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        product()
        best = min(best, time.perf_counter() - started)
    return name, m * k * n / best


def measure(model, data: bytes, threads: int) -> dict:
    """Compress then decompress ``data`` at the defaults on ``threads``, profiled."""
    compressor = Compressor(model, threads=threads)
    sink = io.BytesIO()
    started = time.perf_counter()
    with profiled() as compress_parts:
        stats = compressor.compress_stream(io.BytesIO(data), sink)
    compress_seconds = time.perf_counter() - started
    archive = sink.getvalue()
    decompressor = Decompressor(model, threads=threads)
    started = time.perf_counter()
    with profiled() as decompress_parts:
        restored = decompressor.decompress(archive)
    decompress_seconds = time.perf_counter() - started
    if restored != data:
        raise SystemExit("round trip FAILED")
    for parts, total in ((compress_parts, compress_seconds), (decompress_parts, decompress_seconds)):
        parts[REST] = total - sum(parts.values())
    return {
        "bytes": len(data),
        "archive_bytes": len(archive),
        "symbols": stats.llm_symbols,
        "compress_seconds": compress_seconds,
        "decompress_seconds": decompress_seconds,
        "compress_parts": dict(compress_parts),
        "decompress_parts": dict(decompress_parts),
    }


def run(args: argparse.Namespace, corpus, results, save: Callable[[str, dict], None]) -> None:
    """Measure every file at every thread count; ``--append``: into the rows already stored under the name
    (a row of the same file, threads and bytes is replaced, for example one measured while the machine was
    busy)."""
    model = cache.load(args.model)
    per_token = products_per_token(model.config)
    stored = results / f"{args.name}.json"
    rows = json.loads(stored.read_text())["rows"] if args.append and stored.exists() else []
    command = shlex.join(["python", "bench/bench.py", *sys.argv[1:]])
    for threads in args.thread_counts:
        kernel, rate = roofline_rate(threads)
        peak = instruction_peak(threads)
        for relative, data in corpus_slices(args.files, args.bytes, corpus):
            row = {"file": relative, "threads": threads, "roofline": {"kernel": kernel, "mac_s": rate}}
            row["instruction_peak"] = peak
            row.update(measure(model, data, threads))
            row.update(command=command, date=datetime.date.today().isoformat())
            print(json.dumps(row), flush=True)
            key = (row["file"], row["threads"], row["bytes"])
            rows = [r for r in rows if (r["file"], r["threads"], r["bytes"]) != key] + [row]
            save(  # after every row: a long run stopped early keeps what it measured
                args.name,
                {
                    "kind": "throughput",
                    "model": model.name,
                    "numerics": "exact",
                    "products_per_token": per_token,
                    "rows": rows,
                },
            )


TILES = (
    "The products split into 96-row by 16-column tiles (`llmpipe/engine/products.c`, `product_run`): an encoder "
    "pass of 2,048 "
    "positions against a 576 x 1,536 weight makes 22 x 96 tiles, a decoding step of 64 rows 1 x 96 (36 for the "
    "576-column projections), enough for 16 cores; what bounds many cores' decoding steps besides is the "
    "weights each step reads (135 MB for SmolLM2) and the one-threaded parts."
)
"""Why the products leave work for many cores."""
SERIAL_PARTS = ("mixer (Python)", "range coder", REST)
"""The parts that run on one thread whatever ``-T`` says."""
MANY_CORES = (8, 16)


def scaling(rows: list[dict]) -> list[str]:
    """How each file sped up from 1 to 2 threads, and, on paper, what 8 and 16 cores would give: the
    one-threaded parts as measured, the rest (products, attention, the kernels) divided among the cores
    (:data:`TILES`)."""
    by_file: dict[str, dict[int, dict]] = defaultdict(dict)
    for r in rows:
        by_file[r["file"]][r["threads"]] = r
    lines = []
    for name, runs in sorted(by_file.items()):
        cells = []
        if 1 in runs and 2 in runs:
            for direction in ("compress", "decompress"):
                ratio = runs[1][f"{direction}_seconds"] / runs[2][f"{direction}_seconds"]
                cells.append(f"{direction} {ratio:.2f}x")
            lines.append(f"- {name}, 1 to 2 threads: {', '.join(cells)} faster.")
        if 2 in runs:
            r, estimates = runs[2], []
            for direction in ("compress", "decompress"):
                total = r[f"{direction}_seconds"]
                serial = sum(r[f"{direction}_parts"].get(p, 0.0) for p in SERIAL_PARTS)
                rates = [r["bytes"] / 1024 / (serial + (total - serial) * 2 / cores) for cores in MANY_CORES]
                estimates.append(f"{direction} {' and '.join(f'{x:.1f}' for x in rates)} KB/s")
            lines.append(
                f"- {name}, on paper from its 2-thread profile (one-threaded parts "
                f"{', '.join(SERIAL_PARTS)} as measured, the rest divided among the cores) at "
                f"{' and '.join(str(c) for c in MANY_CORES)} cores: {'; '.join(estimates)}."
            )
    if lines:
        lines.append(f"- {TILES}")
    return lines


def ceilings(rows: list[dict], per_token: int) -> list[str]:
    """What the CPU's multiply-add instruction alone allows (``bench/madd_peak.c``, measured in the same run;
    rows before 2026-12-06 lack it): the input's useful products at that rate and nothing else."""
    lines = []
    for r in rows:
        peak = r.get("instruction_peak")
        if not peak:
            continue
        seconds = r["symbols"] * per_token / (peak["gmac_s"] * 1e9)
        lines.append(
            f"- {r['file']}, {r['threads']} threads: the multiply-add instruction alone does "
            f"{peak['gmac_s']:.0f} G int16 multiply-adds/s here; the network's useful products for this input "
            f"({r['symbols']:,} tokens) at that rate and nothing else would run at **{r['bytes'] / 1024 / seconds:.2f} "
            "KB/s**: a ceiling for either direction (restarted windows' prefill, attention, tables and coding "
            "come on top)."
        )
    return lines


def section(run_data: dict, table_head: Callable[[str], list[str]]) -> list[str]:
    """BENCHMARKS.md's lines for a stored run."""
    per_token = run_data["products_per_token"]
    run_data = {**run_data, "rows": sorted(run_data["rows"], key=lambda r: (r["file"], r["threads"]))}
    commands = sorted({f"`{r['command']}` ({r['date']})" for r in run_data["rows"] if "command" in r})
    lines = [
        __doc__.split("\n\n", 1)[1].replace("\n", " ").strip(),
        "",
        *([f"Rows measured by: {'; '.join(commands)}.", ""] if commands else []),
        f"The network's products: {per_token / 1e6:.1f} M multiply-adds per token. Tokens per second count "
        "the LLM-coded symbols (the model's tokens and escape symbols).",
    ]
    lines += table_head(
        "| file | threads | bytes | bpb | compress KB/s | compress tokens/s | of roofline | decompress KB/s | "
        "decompress tokens/s | of roofline | roofline (kernel, G MAC/s) |"
    )
    for r in run_data["rows"]:
        cells = []
        for direction in ("compress", "decompress"):
            seconds = r[f"{direction}_seconds"]
            tokens = r["symbols"] / seconds
            cells += [
                f"{r['bytes'] / 1024 / seconds:.2f}",
                f"{tokens:.0f}",
                f"{tokens * per_token / r['roofline']['mac_s']:.0%}",
            ]
        roof = f"{r['roofline']['kernel']}, {r['roofline']['mac_s'] / 1e9:.0f}"
        lines.append(
            f"| {r['file']} | {r['threads']} | {r['bytes']} | {8 * r['archive_bytes'] / r['bytes']:.3f} | "
            + " | ".join(cells)
            + f" | {roof} |"
        )
    lines += ["", *scaling(run_data["rows"]), *ceilings(run_data["rows"], per_token)]
    parts = [*PARTS, REST]
    lines += ["", "Where the time goes (seconds, and share of the direction's wall time):"]
    lines += table_head("| file | threads | direction | " + " | ".join(parts) + " |")
    for r in run_data["rows"]:
        for direction in ("compress", "decompress"):
            total, spent = r[f"{direction}_seconds"], r[f"{direction}_parts"]
            cells = [f"{spent.get(p, 0.0):.0f} ({spent.get(p, 0.0) / total:.0%})" for p in parts]
            lines.append(f"| {r['file']} | {r['threads']} | {direction} | " + " | ".join(cells) + " |")
    return lines
