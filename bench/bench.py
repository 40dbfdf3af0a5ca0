"""`make bench`: llmpipe against zstd, xz, brotli and bzip2 on the same bytes, in one run.

    python bench/bench.py run  --name main  [--bytes N] [--chunk-size B] [--batch N] [--numerics exact|float] [FILE ...]
    python bench/bench.py numerics --name numerics [--bytes N] [FILE ...]
    python bench/bench.py mixing --name mixing [--bytes N] [FILE ...]
    python bench/bench.py roofline --name roofline
    python bench/bench.py backup --name backup [--bytes N]
    python bench/bench.py resumable --name enwik8-4mb [--file F] [--budget SECONDS]
    python bench/bench.py sweep --name chunks --file enwik/enwik8_first_1000000 --bytes N
    python bench/bench.py report --write BENCHMARKS.md

Each run stores its measurements as JSON under bench/results/, with the
machine and the command; `report` renders every stored run into
BENCHMARKS.md. Files are named relative to ../shared/corpus and sliced to
their first N bytes (said in the table).
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import brotli
import zstandard

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import throughput  # noqa: E402
from llmpipe import mixer  # noqa: E402
from llmpipe.compressor import Compressor  # noqa: E402
from llmpipe.decompressor import Decompressor  # noqa: E402
from llmpipe.defaults import DEFAULT_BATCH, DEFAULT_CHUNK_SIZE, DEFAULT_CONTEXT, DEFAULT_OVERLAP  # noqa: E402
from llmpipe.errors import ArchiveError  # noqa: E402
from llmpipe.format.container import MAX_ROWS, MAX_WINDOW, ContainerReader  # noqa: E402
from llmpipe.listing import describe  # noqa: E402
from llmpipe.models import cache  # noqa: E402

CORPUS = ROOT.parent / "shared" / "corpus"
RESULTS = ROOT / "bench" / "results"
DEFAULT_FILES = [
    "enwik/enwik8_first_1000000",
    "canterbury/alice29.txt",
    "calgary/book1",
    "calgary/paper1",
    "calgary/news",
    "canterbury/kennedy.xls",
]
FAMOUS = {"alice29.txt", "book1", "bible.txt"}  # likely in the model's training data
BASELINES = {
    "zstd -19 --long=27": ["zstd", "-19", "--long=27", "-c", "-q"],
    "xz -9e": ["xz", "-9e", "-c"],
    "bzip2 -9": ["bzip2", "-9", "-c"],
}


VECTOR_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
"""The CPU flags that decide which product runs fast (two "AMD EPYC" machines here differed in them)."""


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    features: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not features:
                features = [f for f in VECTOR_FEATURES if f in line.split()]
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory, 1),
        "python": platform.python_version(),
        "features": features,
    }


def baseline_bpb(data: bytes) -> dict[str, float]:
    out = {}
    for name, command in BASELINES.items():
        packed = subprocess.run(command, input=data, capture_output=True, check=True).stdout
        out[name] = 8 * len(packed) / len(data)
    out["brotli -q 11"] = 8 * len(brotli.compress(data, quality=11)) / len(data)
    return out


def measure(compressor: Compressor, decompressor: Decompressor | None, data: bytes) -> dict:
    """Compress ``data`` and (unless ``decompressor`` is None) decompress and compare it, timing both."""
    sink = io.BytesIO()
    stats = compressor.compress_stream(io.BytesIO(data), sink)
    archive = sink.getvalue()
    started = time.perf_counter()
    if decompressor is not None and decompressor.decompress(archive) != data:
        raise SystemExit("round trip FAILED")
    decode_seconds = time.perf_counter() - started if decompressor is not None else None
    return {
        "bytes": len(data),
        "archive_bytes": len(archive),
        "bpb": 8 * len(archive) / len(data),
        "ideal_bpb": (stats.ideal_bits + 8 * (len(data) - stats.llm_input_bytes)) / len(data)
        if stats.llm_input_bytes
        else None,
        "llm_blocks": stats.blocks["llm"],
        "other_blocks": stats.blocks["zstd"] + stats.blocks["raw"],
        "coder_overhead": stats.coder_overhead,
        "symbols": stats.llm_symbols,
        "compress_kb_s": len(data) / 1024 / stats.seconds,
        "decompress_kb_s": len(data) / 1024 / decode_seconds if decode_seconds else None,
    }


def save(name: str, payload: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload.update(
        machine=machine(),
        command=shlex.join(["python", Path(sys.argv[0]).resolve().relative_to(ROOT).as_posix(), *sys.argv[1:]]),
        date=datetime.date.today().isoformat(),
    )
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1))
    print(f"wrote {RESULTS / (name + '.json')}")


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
    for relative in args.files or DEFAULT_FILES:
        path = CORPUS / relative
        if not path.exists():
            print(f"skip {relative}: ../shared/corpus not available")
            continue
        data = path.read_bytes()[: args.bytes]
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


def compare_settings(args: argparse.Namespace, files: list[str], settings: dict[str, Callable]) -> list[dict]:
    """Each corpus slice compressed with each named setting (``settings[label](data)`` makes the compressor):
    bits per byte, LLM payload bits per byte and compression speed (compression only)."""
    rows = []
    for relative in args.files or files:
        path = CORPUS / relative
        if not path.exists():
            print(f"skip {relative}: ../shared/corpus not available")
            continue
        data = path.read_bytes()[: args.bytes]
        row: dict = {"file": relative, "bytes": len(data)}
        for label, make_compressor in settings.items():
            sink = io.BytesIO()
            stats = make_compressor(data).compress_stream(io.BytesIO(data), sink)
            row[label] = {
                "bpb": 8 * len(sink.getvalue()) / len(data),
                "llm_bpb": 8 * stats.llm_payload_bytes / stats.llm_input_bytes if stats.llm_input_bytes else None,
                "compress_kb_s": len(data) / 1024 / stats.seconds,
            }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def compare_numerics(args: argparse.Namespace) -> None:
    """The price of exactness: the same slices coded with the exact and the float engine (compression only)."""
    model = cache.load(args.model)
    settings = {
        numerics: lambda data, numerics=numerics: Compressor(model, threads=args.threads, numerics=numerics)
        for numerics in ("exact", "float")
    }
    rows = compare_settings(args, DEFAULT_FILES[:4], settings)
    save(args.name, {"kind": "numerics", "model": model.name, "rows": rows})


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
        made.mixer_version = version  # version 1: as llmpipe 0.4 wrote, without the adaptive bias
        return made

    versions = (("on", mixer.VERSION), ("no bias", 1), ("off", 0))
    settings = {label: lambda data, v=version: compressor(data, v) for label, version in versions}
    rows = compare_settings(args, MIXING_FILES, settings)
    payload = {"kind": "mixing", "model": model.name, "numerics": "exact", "chunk_size": DEFAULT_CHUNK_SIZE}
    save(args.name, {**payload, "rows": rows})


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
STEP_LENGTHS = [64, 256, 512, 1024, 2048, 4096, 8192]


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
    costs = {batch: _decoder_costs(engine, batch) for batch in CONTEXT_BATCHES}
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


def _decoder_costs(engine, batch: int, lengths: list[int] = STEP_LENGTHS) -> tuple[dict[int, float], float]:
    """Milliseconds of one lockstep step of ``batch`` rows at each cache length (the network and the
    frequency tables, as ``LockstepSession.step``), and of prefill per row-token."""
    import torch

    from llmpipe.coder.frequencies import frequency_tables
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
    from llmpipe.engine import native
    from llmpipe.engine.exact_engine import ExactEngine

    model = cache.load(args.model)
    paths = {}
    for path, switch in (("kernels", "1"), ("torch", "0")):
        os.environ["LLMPIPE_NATIVE"] = switch
        native._kernels.cache_clear()
        steps_ms, prefill_ms = _decoder_costs(ExactEngine(model, args.threads), 64)
        paths[path] = {"step_ms": steps_ms, "prefill_ms_per_token": prefill_ms}
        print(json.dumps({path: paths[path]}), flush=True)
    os.environ.pop("LLMPIPE_NATIVE")
    native._kernels.cache_clear()
    save(args.name, {"kind": "steps", "model": model.name, "numerics": "exact", "rows": 64, "paths": paths})


ROWS_LENGTHS = [256, 1024, 2048]
"""Cache lengths of the rows-per-step comparison (256 rows at 8,192 positions would need a 24 GB cache)."""


def step_rows(args: argparse.Namespace) -> None:
    """One decoding step (compiled kernels) at 64, 128 and 256 rows: what more rows per step would buy."""
    from llmpipe.engine.exact_engine import ExactEngine

    model = cache.load(args.model)
    batches = {}
    for batch in args.batches:
        steps_ms, prefill_ms = _decoder_costs(ExactEngine(model, args.threads), batch, ROWS_LENGTHS)
        batches[batch] = {"step_ms": steps_ms, "prefill_ms_per_token": prefill_ms}
        print(json.dumps({batch: batches[batch]}), flush=True)
    save(args.name, {"kind": "step-rows", "model": model.name, "numerics": "exact", "batches": batches})


def _modelled_file_seconds(
    size: int, chunk_size: int, tokens_per_byte: float, window: int, overlap: int, costs: dict
) -> float:
    """Decoder time for a file of ``size`` bytes cut into rows of ``chunk_size``, in lockstep passes of at
    most 64 rows: each pass's steps at its batch and cache lengths, and its restarts' prefill."""
    import numpy as np

    from llmpipe.codec import ContextWindow

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


WORK = ROOT / "bench" / "out"  # partial archives of resumable runs (not committed)


def resumable(args: argparse.Namespace) -> None:
    """Compress a long file with the CLI's ``--resume``, at most ``--budget`` seconds per call.

    Each call continues the partial archive of the last one (kept in
    bench/out/), so the 4 MB enwik8 prefix (about an hour on 2 cores) can be
    done over several ``make bench`` runs. The time is summed over the calls;
    the result is recorded once the archive is complete, the progress before.
    """
    source = CORPUS / args.file
    if not source.exists():
        print(f"skip {args.file}: ../shared/corpus not available")
        return
    WORK.mkdir(parents=True, exist_ok=True)
    target = WORK / f"{source.name}.llmp"
    state_path = WORK / f"{args.name}.state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"seconds": 0.0, "calls": 0}
    if not target.exists():
        command = [sys.executable, str(ROOT / "bin" / "llmpipe"), "-z", "--resume", "-q", "-o", str(target)]
        started = time.perf_counter()
        process = subprocess.Popen([*command, str(source)])
        try:
            process.wait(timeout=args.budget)
        except subprocess.TimeoutExpired:
            process.terminate()  # with --resume the CLI keeps TARGET.part for the next call
            process.wait()
        state["seconds"] += time.perf_counter() - started
        state["calls"] += 1
        state_path.write_text(json.dumps(state))
    size = source.stat().st_size
    part = Path(f"{target}.part")
    made = target if target.exists() else part
    result = {"kind": "resumable", "file": args.file, "bytes": size, "model": _model_name(made), "numerics": "exact"}
    result.update(state)
    if target.exists():
        archive = target.read_bytes()
        result.update(
            complete=True,
            archive_bytes=len(archive),
            bpb=8 * len(archive) / size,
            listing=describe(io.BytesIO(archive), target.name),
            baselines=baseline_bpb(source.read_bytes()),
        )
    else:
        result.update(complete=False, done_bytes=_bytes_in_partial(part))
    print(json.dumps({k: v for k, v in result.items() if k != "listing"}), flush=True)
    save(args.name, result)


def _model_name(archive: Path) -> str | None:
    """The model named in an archive's (or partial archive's) header, if it has one yet."""
    try:
        with archive.open("rb") as f:
            return ContainerReader(f, archive.name).read_stream_header(first=True)["model"]["name"]
    except (OSError, ArchiveError, KeyError, TypeError):
        return None


def _bytes_in_partial(part: Path) -> int:
    """Original bytes held by the complete blocks of a partial archive."""
    if not part.exists():
        return 0
    with part.open("rb") as f:
        reader = ContainerReader(f, part.name)
        try:
            reader.read_stream_header(first=True)
            while reader.read_block(MAX_WINDOW, MAX_ROWS) is not None:
                pass
        except ArchiveError:
            pass  # the interrupted end
        return reader.total


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


BINARY_FILES = [
    "canterbury/kennedy.xls",
    "canterbury/ptt5",
    "canterbury/sum",
    "calgary/geo",
    "calgary/obj1",
    "calgary/obj2",
    "calgary/pic",
]


def backup(args: argparse.Namespace) -> None:
    """Binary files against zstd -19, and `llmpipe -l` on a 1 MB archive of many blocks."""
    model = cache.load(args.model)
    compressor = Compressor(model, threads=args.threads)
    decompressor = Decompressor(model, threads=args.threads)
    rows = []
    for relative in BINARY_FILES:
        path = CORPUS / relative
        if not path.exists():
            print(f"skip {relative}: ../shared/corpus not available")
            continue
        data = path.read_bytes()[: args.bytes]
        archive = compressor.compress(data)
        if decompressor.decompress(archive) != data:
            raise SystemExit("round trip FAILED")
        zstd = subprocess.run(["zstd", "-19", "-c", "-q"], input=data, capture_output=True, check=True).stdout
        with io.BytesIO(archive) as source:
            info = describe(source, relative, blocks=True)
        stream = info["streams"][0]
        framing = stream["header_bytes"] + stream["index_bytes"] + 16 * len(stream["block_list"])
        library = zstandard.ZstdCompressor(level=19).compressobj()
        linked = len(library.compress(data) + library.flush())  # the libzstd llmpipe itself links
        row = {"file": relative, "bytes": len(data), "llmpipe": len(archive), "zstd": len(zstd), "zstd_lib": linked}
        row.update(framing=framing, blocks=stream["blocks"])
        row["within"] = len(archive) <= 1.01 * len(zstd) + framing
        row["within_lib"] = len(archive) <= 1.01 * linked + framing
        print(json.dumps(row), flush=True)
        rows.append(row)
    listing = _time_listing(args)
    save(args.name, {"kind": "backup", "model": model.name, "numerics": "exact", "rows": rows, "listing": listing})


def _time_listing(args: argparse.Namespace) -> dict:
    """Make a 1 MB archive of many blocks with the tiny test model (fast), then time `llmpipe -l` on it."""
    tiny = ROOT / "tests" / "data" / "tiny-llama"
    text = b""
    for relative in ("calgary/book1", "calgary/book2", "canterbury/lcet10.txt", "calgary/news", "calgary/paper1"):
        if (CORPUS / relative).exists():
            text += (CORPUS / relative).read_bytes()
    compressor = Compressor(cache.load(str(tiny)), chunk_size=256, batch=64, threads=args.threads)
    with tempfile.TemporaryDirectory() as folder:
        archive = Path(folder) / "big.llmp"
        with archive.open("wb") as sink:
            writer = compressor.writer(sink)
            position = 0
            while sink.tell() < 1_000_000 and position < len(text):
                writer.write(text[position : position + 65536])
                position += 65536
            writer.close()
        launcher = [sys.executable, str(ROOT / "bin" / "llmpipe")]
        timings = {}
        for label, extra in (("-l", []), ("-l -v --json", ["-v", "--json"])):
            started = time.perf_counter()
            subprocess.run([*launcher, "-l", *extra, str(archive)], capture_output=True, check=True)
            timings[label] = time.perf_counter() - started
        with archive.open("rb") as source:
            info = describe(source, "big.llmp")
    return {"archive_bytes": info["compressed_bytes"], "blocks": sum(info["streams"][0]["blocks"].values()), **timings}


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


def roofline(args: argparse.Namespace) -> None:
    """Matrix-product throughput of this CPU: fp32 GEMM, exact int8 ``torch._int_mm`` and llmpipe's exact
    int16-by-int8 kernel (``Kernels.exact_matmul``, one product per weight where ``_int_mm`` takes two)."""
    import torch

    from llmpipe.engine import native

    torch.set_num_threads(args.threads)
    kernels = native.kernels_for(torch.device("cpu"))
    rows = []
    for m, k, n in ROOFLINE_SHAPES:
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8)
        b = torch.randint(-127, 128, (k, n), dtype=torch.int8)
        q = torch.randint(-32639, 32640, (m // 2, k)).float()  # the int16 rows that make m int8 rows
        row: dict = {"m": m, "k": k, "n": n}
        cases = {"int8": (torch._int_mm, a, b), "fp32": (torch.matmul, a.float(), b.float())}
        if kernels is not None:
            ones = torch.ones(m // 2, 1), torch.ones(n)
            cases["int16"] = (lambda x, y, ones=ones: kernels.exact_matmul(x, ones[0], y, ones[1], None), q, b)
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
    save(args.name, {"kind": "roofline", "model": "-", "threads": args.threads, "rows": rows})


def _numerics_label(run_data: dict) -> str:
    """Which engine a stored run used (runs from before the exact engine have no field: float)."""
    kind = run_data["kind"]
    if kind == "numerics":
        return "exact and float numerics"
    if kind == "roofline":
        return "no engine"
    if kind == "memory":
        return "exact and float numerics"
    return f"{run_data.get('numerics', 'float')} numerics"


def report(args: argparse.Namespace) -> None:
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python bench/bench.py report` from the runs stored in `bench/results/`",
        "(`make bench` reruns them). Bits per byte (bpb) = 8 x archive bytes / input bytes, the",
        "whole archive included (header, block headers, index and footer). *ideal* is the code length",
        "under the coded frequency tables (sum of -log2 freq/total) for LLM-coded blocks plus 8 bits",
        "per byte elsewhere; coder overhead is the LLM payload against that ideal. KB/s = 1024 bytes",
        "of input per second. Each section names the numerics it ran with (exact is the default).",
        "",
    ]
    for path in sorted(RESULTS.glob("*.json")):
        run_data = json.loads(path.read_text())
        if run_data.get("kind", "").startswith("steering"):
            continue  # bench/steering.py's runs: STEERING.md reports them
        m = run_data["machine"]
        lines += [
            f"## {path.stem}",
            "",
            f"`{run_data['command']}` on {run_data['date']}; model `{run_data['model']}`, {_numerics_label(run_data)};",
            f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Python {m['python']}"
            + (f", {' '.join(m['features']) or 'no AVX2'}." if "features" in m else "."),
            "",
        ]
        if run_data["kind"] == "files":
            names = list(run_data["rows"][0]["baselines"]) if run_data["rows"] else []
            lines.append(
                f"Chunk size {run_data['chunk_size']} bytes, batch {run_data['batch']}, context "
                f"{run_data.get('context', {'window': 0, 'overlap': 0})} tokens (window 0: the whole chunk). "
                "Famous texts (*) are probably in the model's training data."
            )
            lines += _table_head(
                "| file | bytes | llmpipe bpb | ideal bpb | coder overhead | "
                + " | ".join(names)
                + " | compress KB/s | decompress KB/s |"
            )
            for r in run_data["rows"]:
                star = "*" if Path(r["file"]).name in FAMOUS else ""
                ideal = f"{r['ideal_bpb']:.3f}" if r["ideal_bpb"] else "-"
                base = " | ".join(f"{r['baselines'][n]:.3f}" for n in names)
                lines.append(
                    f"| {r['file']}{star} | {r['bytes']} | **{r['bpb']:.3f}** | {ideal} | "
                    f"{100 * r['coder_overhead']:.2f}% | {base} | "
                    f"{r['compress_kb_s']:.2f} | {_kb_s(r['decompress_kb_s'])} |"
                )
        elif run_data["kind"] == "memory":
            lines += _memory_section(run_data)
        elif run_data["kind"] == "throughput":
            lines += throughput.section(run_data, _table_head)
        elif run_data["kind"] == "roofline":
            lines.append(
                f"Matrix products on {run_data['threads']} threads (GMAC/s = 10^9 multiply-adds per second): "
                "float32 GEMM and exact int8 `torch._int_mm` on rows x reduction x outputs, and llmpipe's exact "
                "int16-by-int8 kernel (`exact_matmul`) on half as many int16 rows, the same work as the int8 "
                "rows they split into (so its ms compare directly with `_int_mm`'s; its GMAC/s count int16 "
                "multiply-adds, one per weight and row)."
            )
            has_int16 = all("int16" in r for r in run_data["rows"])
            head = "| rows x reduction x outputs | int8 ms | int8 GMAC/s | fp32 ms | fp32 GMAC/s |"
            lines += _table_head(head + (" int16 kernel ms | int16 GMAC/s |" if has_int16 else ""))
            for r in run_data["rows"]:
                i8, f32 = r["int8"], r["fp32"]
                line = (
                    f"| {r['m']} x {r['k']} x {r['n']} | {i8['ms']:.2f} | {i8['gmac_s']:.0f} | "
                    f"{f32['ms']:.2f} | {f32['gmac_s']:.0f} |"
                )
                if has_int16:
                    line += f" {r['int16']['ms']:.2f} | {r['int16']['gmac_s']:.0f} |"
                lines.append(line)
        elif run_data["kind"] == "numerics":
            lines.append(
                "The same slices compressed with the exact engine (the default) and the float32 engine, "
                "default settings. *LLM bpb* counts only the range-coded payloads over the bytes they hold: "
                "its difference is the cost of exact integer arithmetic (whole-archive bpb also differs by "
                "the float header's longer machine fingerprint)."
            )
            lines += _comparison_table(run_data["rows"], "exact", "float")
        elif run_data["kind"] == "mixing":
            lines.append(
                "The mixer (FORMAT.md section 5): *on* = the adaptive bias on the model's tables, then the "
                "history experts (n-gram orders 1-6 and a match model over each row) mixed in online; *no bias* = "
                "the history experts alone (mixer version 1, what llmpipe 0.4 wrote); *off* = the model's tables "
                f"as they are. Rows of {run_data['chunk_size']} bytes, exact numerics, other settings default. "
                "*LLM bpb* counts the range-coded payloads over the bytes they hold. alice29.txt and book1 are "
                "famous texts the model may have memorised."
            )
            lines += _comparison_table(run_data["rows"], "on", "no bias")
            lines += ["", "The history experts alone against no mixing:", ""]
            lines += _comparison_table(run_data["rows"], "no bias", "off")
        elif run_data["kind"] == "resumable":
            if run_data["complete"]:
                base = ", ".join(f"{k} {v:.3f}" for k, v in run_data["baselines"].items())
                lines.append(
                    f"`{run_data['file']}` ({run_data['bytes']} bytes), default settings, compressed with the CLI's "
                    f"`--resume` over {run_data['calls']} call(s): **{run_data['archive_bytes']} bytes, "
                    f"{run_data['bpb']:.4f} bits per byte**, {run_data['seconds'] / 60:.1f} minutes of compression "
                    f"({run_data['bytes'] / 1024 / run_data['seconds']:.2f} KB/s). Same bytes: {base}. "
                    "Decompression not timed here; the same coder's round trips are tested."
                )
            else:
                lines.append(
                    f"`{run_data['file']}` ({run_data['bytes']} bytes), default settings, compressed with the CLI's "
                    f"`--resume`: **in progress**, {run_data['done_bytes']} bytes coded after "
                    f"{run_data['seconds'] / 60:.1f} minutes over {run_data['calls']} call(s); the next `make bench` "
                    "continues it."
                )
        elif run_data["kind"] == "backup":
            lines.append(
                "Binary files (first bytes of each) against the `zstd -19` command on the same bytes. *framing* "
                "is the stream header, index and footer plus 16 bytes per block header; the goal is llmpipe <= "
                "1.01 x zstd + framing. *libzstd* is level 19 through the library llmpipe links (python-zstandard), "
                "whose version can differ from the command's."
            )
            lines += _table_head(
                "| file | bytes | llmpipe bytes | zstd -19 bytes | libzstd bytes | framing | within goal (zstd) | "
                "within goal (libzstd) | blocks llm/zstd/raw |"
            )
            for r in run_data["rows"]:
                b = r["blocks"]
                lines.append(
                    f"| {r['file']} | {r['bytes']} | {r['llmpipe']} | {r['zstd']} | {r['zstd_lib']} | "
                    f"{r['framing']} | {'yes' if r['within'] else 'NO'} | {'yes' if r['within_lib'] else 'NO'} | "
                    f"{b['llm']}/{b['zstd']}/{b['raw']} |"
                )
            t = run_data["listing"]
            lines += [
                "",
                f"`llmpipe -l` on an archive of {t['archive_bytes']} bytes and {t['blocks']} blocks (made with the "
                f"tiny test model, 256-byte chunks): **{t['-l']:.2f} s** wall time for the whole command "
                f"(Python start-up included), {t['-l -v --json']:.2f} s with every block as JSON. No model is "
                "loaded and torch is not imported.",
            ]
        elif run_data["kind"] == "context":
            costs = run_data["costs"]
            steps = "; ".join(
                f"{batch} rows: " + ", ".join(f"{n}: {ms:.0f}" for n, ms in cost["step_ms"].items()) + " ms"
                for batch, cost in costs.items()
            )
            prefill = ", ".join(f"{cost['prefill_ms_per_token']:.2f}" for cost in costs.values())
            lines.append(
                f"Context beyond the row, on {run_data['slices']} slices of {run_data['slice_bytes']} bytes spread "
                f"evenly over `{run_data['file']}` (each cut into rows of the setting's length; no steering): row "
                "length x context window x overlap (tokens; window 0 = the whole row). bpb and compression speed "
                f"are measured. Decompression speed is *modelled* for the whole {run_data['file_bytes']}-byte file "
                "(its rows in lockstep passes of at most 64) from one step's time measured in the same run at each "
                f"cache length and batch ({steps}) and prefill at {prefill} ms per row-token for each restart; "
                "it counts the network and the frequency tables, not the coder and mixer, which cost the same "
                "per symbol in every setting."
            )
            lines += _table_head(
                "| row bytes | window | overlap | bpb | ideal bpb | compress KB/s | modelled decompress KB/s |"
            )
            for r in run_data["rows"]:
                lines.append(
                    f"| {r['chunk_size']} | {r['window']} | {r['overlap']} | {r['bpb']:.3f} | {r['ideal_bpb']:.3f} | "
                    f"{r['compress_kb_s']:.2f} | {r['modelled_decompress_kb_s']:.2f} |"
                )
        elif run_data["kind"] == "steps":
            kernels, plain = run_data["paths"]["kernels"], run_data["paths"]["torch"]
            lines.append(
                f"One decoding step for {run_data['rows']} rows (the network and the frequency tables; the "
                "fastest of five) at each length of cache, with the compiled kernels (`llmpipe/engine/kernels.c`) "
                "and with the torch path that runs without a C compiler (`LLMPIPE_NATIVE=0`): the same numbers, "
                "by different code. Prefill is a restart's cost per row and position."
            )
            lines += _table_head("| positions of context | kernels ms | torch path ms | torch / kernels |")
            for length, ms in kernels["step_ms"].items():
                other = plain["step_ms"][length]
                lines.append(f"| {int(length):,} | {ms:.0f} | {other:.0f} | {other / ms:.1f}x |")
            lines.append(
                f"| prefill per row-token | {kernels['prefill_ms_per_token']:.2f} | "
                f"{plain['prefill_ms_per_token']:.2f} | "
                f"{plain['prefill_ms_per_token'] / kernels['prefill_ms_per_token']:.1f}x |"
            )
        elif run_data["kind"] == "step-rows":
            lines.append(
                "One decoding step (network and frequency tables, compiled kernels, the fastest of five) at each "
                "number of rows decoded together and length of cache, and its time per row: the cost of a "
                "decoded token when that many rows share each pass over the weights. Prefill is a restart's "
                "cost per row and position."
            )
            head = " | ".join(f"ms at {n:,} | ms per row at {n:,}" for n in ROWS_LENGTHS)
            lines += _table_head(f"| rows | {head} | prefill per row-token ms |")
            for batch, costs in run_data["batches"].items():
                step = costs["step_ms"]
                cells = " | ".join(f"{step[str(n)]:.0f} | {step[str(n)] / int(batch):.2f}" for n in ROWS_LENGTHS)
                lines.append(f"| {batch} | {cells} | {costs['prefill_ms_per_token']:.2f} |")
        elif run_data["kind"] == "roundtrip":
            rows = run_data["rows"]
            passed = sum(r["ok"] for r in rows)
            lines.append(
                f"`llmpipe -c` then `llmpipe -d` through the CLI on every file of `../shared/corpus`, each sliced "
                f"to its first {max(r['bytes'] for r in rows)} bytes, chunk size {run_data['chunk_size']}: "
                f"**{passed} of {len(rows)} identical**. bpb includes the stream header "
                "(about 380 bytes with exact numerics)."
            )
            lines += _table_head("| file | bytes | identical | bpb | seconds (both directions) |")
            for r in rows:
                ok = "yes" if r["ok"] else "NO"
                lines.append(f"| {r['file']} | {r['bytes']} | {ok} | {r['bpb']:.3f} | {r['seconds']:.1f} |")
        else:
            lines.append(
                f"Chunk size sweep on the first {run_data['rows'][0]['bytes']} bytes of `{run_data['file']}`, "
                "batch = chunks in the input (one lockstep group)."
            )
            lines += _table_head("| chunk size | batch | bpb | ideal bpb | compress KB/s | decompress KB/s |")
            for r in run_data["rows"]:
                lines.append(
                    f"| {r['chunk_size']} | {r['batch']} | {r['bpb']:.3f} | {r['ideal_bpb']:.3f} | "
                    f"{r['compress_kb_s']:.2f} | {r['decompress_kb_s']:.2f} |"
                )
        lines.append("")
    notes = ROOT / "bench" / "NOTES.md"
    if notes.exists():
        lines.append(notes.read_text())
    Path(args.write).write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {args.write}")


def _memory_section(run_data: dict) -> list[str]:
    """``bench/memory.py``: preparing and loading int8 weights, and coding memory against the plan."""
    prep, load = run_data["prepare"], run_data["load"]
    int8 = prep["int8_file_bytes"]
    lines = [
        f"Memory above each process's baseline (peak anonymous memory, and peak resident set including pages of "
        f"the memory-mapped weight files), sampled every 10 ms. Preparing the exact engine's int8 weights "
        f"({int8 / 2**30:.2f} GiB) from the float16 cache of a random `{run_data['config']}` "
        f"({run_data['layers']} layers):",
    ]
    lines += _table_head("| step | seconds | peak anonymous | x int8 size | peak resident | x int8 size |")
    for name, r in (("prepare int8 weights (first run)", prep), ("load the exact engine", load)):
        lines.append(
            f"| {name} | {r['seconds']:.1f} | {r['anon_bytes'] / 2**30:.2f} GiB | {r['anon_bytes'] / int8:.2f} | "
            f"{r['rss_bytes'] / 2**30:.2f} GiB | {r['rss_bytes'] / int8:.2f} |"
        )
    lines += [
        "",
        f"Compressing {run_data['coding'][0]['bytes']} bytes with the same configuration cut to "
        f"{run_data['code_layers']} layers, batch 4: the plan (`llmpipe models --plan`, printed by `-v`) against "
        "the measured peak. The resident set counts the pages of the memory-mapped weight files the run read "
        "(the float16 model file, and the exact engine's int8 file, which it runs on directly), which the kernel "
        "reclaims under pressure; anonymous memory is what the run holds. The plan's activation part is an "
        "estimate; where anonymous memory exceeds the plan (8-bit weights on the CPU), the cause is not traced yet.",
    ]
    lines += _table_head("| engine | plan | peak anonymous | peak resident | resident / plan |")
    for r in run_data["coding"]:
        engine = (
            "exact" if r["numerics"] == "exact" else f"float {r['dtype']}" + (" 8-bit" if r["load_in_8bit"] else "")
        )
        lines.append(
            f"| {engine} | {r['plan_bytes'] / 2**20:.0f} MiB | {r['anon_bytes'] / 2**20:.0f} MiB | "
            f"{r['rss_bytes'] / 2**20:.0f} MiB | {r['rss_bytes'] / r['plan_bytes']:.2f} |"
        )
    return lines


def _comparison_table(rows: list[dict], a: str, b: str) -> list[str]:
    """The table of a ``compare_settings`` run: settings ``a`` and ``b`` side by side, the change of LLM bpb."""
    lines = _table_head(
        f"| file | bytes | {a} bpb | {b} bpb | {a} LLM bpb | {b} LLM bpb | "
        f"{a} vs {b} (LLM) | {a} compress KB/s | {b} compress KB/s |"
    )
    for r in rows:
        x, y = r[a], r[b]
        lines.append(
            f"| {r['file']} | {r['bytes']} | {x['bpb']:.4f} | {y['bpb']:.4f} | {x['llm_bpb']:.4f} | "
            f"{y['llm_bpb']:.4f} | {100 * (x['llm_bpb'] / y['llm_bpb'] - 1):+.2f}% | {x['compress_kb_s']:.2f} | "
            f"{y['compress_kb_s']:.2f} |"
        )
    return lines


def _table_head(header: str) -> list[str]:
    """A blank line, the Markdown table header and its separator (one ``---`` per column)."""
    return ["", header, "|" + "---|" * (header.count("|") - 1)]


def _kb_s(value: float | None) -> str:
    return f"{value:.2f}" if value else "not run"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    names = (
        "run",
        "numerics",
        "mixing",
        "sweep",
        "roundtrip",
        "roofline",
        "backup",
        "context",
        "steps",
        "step-rows",
        "resumable",
    )
    for name in names:
        p = sub.add_parser(name)
        p.add_argument("--name", required=True)
        p.add_argument("--model", default=None)
        p.add_argument("--bytes", type=int, default=131072)
        p.add_argument("--threads", type=int, default=2)
    runner = sub.choices["run"]
    runner.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    runner.add_argument("--batch", type=int, default=DEFAULT_BATCH)
    runner.add_argument("--numerics", choices=("exact", "float"), default="exact")
    runner.add_argument("--context", type=int, default=DEFAULT_CONTEXT, help="context window (0: the whole row)")
    runner.add_argument("--overlap", type=int, default=DEFAULT_OVERLAP)
    runner.add_argument("--compress-only", action="store_true", help="skip the (slower) decompression")
    runner.add_argument("files", nargs="*")
    sub.choices["numerics"].add_argument("files", nargs="*")
    sub.choices["mixing"].add_argument("files", nargs="*")
    sub.choices["resumable"].add_argument("--file", default="enwik/enwik8_first_4000000")
    sub.choices["resumable"].add_argument("--budget", type=float, default=3600, help="seconds for this call")
    sub.choices["roundtrip"].add_argument("--chunk-size", type=int, default=512)
    sub.choices["roundtrip"].add_argument("--batch", type=int, default=DEFAULT_BATCH)
    sub.choices["context"].add_argument("--file", default="enwik/enwik8_first_1000000")
    sub.choices["context"].add_argument("--slices", type=int, default=6, help="slices of --bytes spread over the file")
    sweeper = sub.choices["sweep"]
    sweeper.add_argument("--file", default="enwik/enwik8_first_1000000")
    sweeper.add_argument("--chunk-sizes", type=int, nargs="+", default=[2048, 8192, 16384])
    sub.choices["step-rows"].add_argument("--batches", type=int, nargs="+", default=[64, 128, 256])
    speeds = sub.add_parser("throughput")
    speeds.add_argument("--name", required=True)
    speeds.add_argument("--model", default=None)
    speeds.add_argument("--bytes", type=int, default=1_000_000)
    speeds.add_argument("--threads", dest="thread_counts", type=int, nargs="+", default=[1, 2])
    speeds.add_argument("--append", action="store_true", help="add to (or replace in) the stored rows")
    speeds.add_argument("files", nargs="*", default=["enwik/enwik8_first_1000000", "calgary/paper2"])
    sub.add_parser("report").add_argument("--write", default=str(ROOT / "BENCHMARKS.md"))
    args = parser.parse_args()
    commands = {
        "run": run,
        "numerics": compare_numerics,
        "mixing": compare_mixing,
        "sweep": sweep,
        "roundtrip": roundtrip,
        "roofline": roofline,
        "backup": backup,
        "context": context_grid,
        "steps": decoding_steps,
        "step-rows": step_rows,
        "resumable": resumable,
        "throughput": lambda a: throughput.run(a, CORPUS, RESULTS, save),
        "report": report,
    }
    commands[args.command](args)


if __name__ == "__main__":
    main()
