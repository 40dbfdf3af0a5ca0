"""`make demo`: compress a text with the default model, decompress it, compare, print ratio and speed.

Uses the first 64 KB of enwik8 from ../shared/corpus when it exists, else the
texts shipped in tests/data.
"""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmpipe.pipeline.compress import Compressor  # noqa: E402
from llmpipe.pipeline.decompress import Decompressor  # noqa: E402

CORPUS_FILE = ROOT.parent / "shared" / "corpus" / "enwik" / "enwik8_first_1000000"


def main() -> None:
    if CORPUS_FILE.exists():
        name, data = "enwik8 (first 65536 bytes)", CORPUS_FILE.read_bytes()[:65536]
    else:
        name = "tests/data (shipped texts)"
        data = b"".join(p.read_bytes() for p in sorted((ROOT / "tests" / "data").glob("*.t*")))
    compressor = Compressor()
    print(f"model loaded in {compressor.model.load_seconds:.2f} s; compressing {name}, {len(data)} bytes ...")
    sink = io.BytesIO()
    stats = compressor.compress_stream(io.BytesIO(data), sink)
    archive = sink.getvalue()
    started = time.perf_counter()
    restored = Decompressor(compressor.model).decompress(archive)
    seconds = time.perf_counter() - started
    if restored != data:
        raise SystemExit("demo FAILED: the round trip did not reproduce the input")
    xz = subprocess.run(["xz", "-9e", "-c"], input=data, capture_output=True).stdout
    print(f"round trip OK: {len(data)} -> {len(archive)} bytes")
    print(f"  llmpipe {8 * len(archive) / len(data):.3f} bits/byte (xz -9e: {8 * len(xz) / len(data):.3f})")
    print(f"  compress {len(data) / 1024 / stats.seconds:.2f} KB/s, decompress {len(data) / 1024 / seconds:.2f} KB/s")
    print(f"  coder overhead against the model's ideal code length: {100 * stats.coder_overhead:.2f}%")


if __name__ == "__main__":
    main()
