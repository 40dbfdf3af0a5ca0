"""`bench.py backup`: backup-style inputs (text and binary files) and the listing's speed."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zstandard

from bench.common import CORPUS, ROOT, archive_layout, corpus_slices, save
from llmpipe.cli.listing import describe
from llmpipe.models import cache
from llmpipe.pipeline.compress import Compressor
from llmpipe.pipeline.decompress import Decompressor

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
    for relative, data in corpus_slices(BINARY_FILES, args.bytes):
        archive = compressor.compress(data)
        if decompressor.decompress(archive) != data:
            raise SystemExit("round trip FAILED")
        zstd = subprocess.run(["zstd", "-19", "-c", "-q"], input=data, capture_output=True, check=True).stdout
        with io.BytesIO(archive) as source:
            stream = describe(source, relative)["streams"][0]
        framing = archive_layout(archive)[0]
        library = zstandard.ZstdCompressor(level=19).compressobj()
        linked = len(library.compress(data) + library.flush())  # the libzstd llmpipe itself links
        row = {"file": relative, "bytes": len(data), "llmpipe": len(archive), "zstd": len(zstd), "zstd_lib": linked}
        row.update(framing=framing, rows=stream["rows"])
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
    return {"archive_bytes": info["compressed_bytes"], "blocks": info["streams"][0]["blocks"], **timings}
