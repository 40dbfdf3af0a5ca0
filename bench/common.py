"""What every benchmark shares: the corpus, the baselines (zstd, xz, brotli, bzip2), the machine, timing a
round trip, and storing a run's JSON under bench/results/."""

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
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import brotli

from llmpipe.format.container import ContainerReader
from llmpipe.format.fields import MAX_ROWS, MAX_WINDOW
from llmpipe.pipeline.compress import Compressor
from llmpipe.pipeline.decompress import Decompressor

ROOT = Path(__file__).resolve().parent.parent

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


def corpus_slices(names: list[str], size: int, corpus: Path = CORPUS) -> Iterator[tuple[str, bytes]]:
    """Each named corpus file (relative to ``corpus``) and its first ``size`` bytes; a missing file (no
    ../shared/corpus) is skipped, saying so."""
    for relative in names:
        path = corpus / relative
        if not path.exists():
            print(f"skip {relative}: ../shared/corpus not available")
            continue
        yield relative, path.read_bytes()[:size]


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
        "llm_rows": stats.rows["llm"],
        "other_rows": stats.rows["zstd"] + stats.rows["raw"],
        "coder_overhead": stats.coder_overhead,
        "symbols": stats.llm_symbols,
        "framing_bytes": archive_layout(archive)[0],
        "compress_kb_s": len(data) / 1024 / stats.seconds,
        "decompress_kb_s": len(data) / 1024 / decode_seconds if decode_seconds else None,
    }


def archive_layout(archive: bytes) -> tuple[int, int]:
    """What an archive spends besides its rows' payloads (stream headers, block headers, index, footer: its
    framing), and how many rows it has."""
    reader = ContainerReader(io.BytesIO(archive), "archive")
    payloads = rows = 0
    first = True
    while reader.read_stream_header(first) is not None:
        first = False
        while (block := reader.read_block(MAX_WINDOW, MAX_ROWS)) is not None:
            payloads += sum(len(row.payload) for row in block.rows)
            rows += len(block.rows)
    return len(archive) - payloads, rows


def save(name: str, payload: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload.update(
        machine=machine(),
        command=shlex.join(["python", Path(sys.argv[0]).resolve().relative_to(ROOT).as_posix(), *sys.argv[1:]]),
        date=datetime.date.today().isoformat(),
    )
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=1))
    print(f"wrote {RESULTS / (name + '.json')}")


def compare_settings(args: argparse.Namespace, files: list[str], settings: dict[str, Callable]) -> list[dict]:
    """Each corpus slice compressed with each named setting (``settings[label](data)`` makes the compressor):
    bits per byte, LLM payload bits per byte and compression speed (compression only)."""
    rows = []
    for relative, data in corpus_slices(args.files or files, args.bytes):
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
