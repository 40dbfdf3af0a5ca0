"""On a machine with a CUDA GPU: do exact archives decode across CPU and GPU, bit for bit?

Not part of the test suite (CI has no GPU). Run it where a GPU is lent, from
the repository root, with ``zstandard`` available (the device image lacks it:
carry its wheel, see ``tests/device/README.md``)::

    PYTHONPATH=. python3 tests/device/cross_decode.py --out report.json

For each architecture's tiny test model (Llama committed in ``tests/data``,
GPT-NeoX and GPT-2 built on the spot) it checks, and reports as JSON:

1. frequency tables of fresh random inputs: CPU full-sequence at batch 64 ==
   CUDA full-sequence at batch 64 == CUDA incremental at batch 7;
2. the pinned table digests of ``tests/engine/test_exact_transformer.py``,
   recomputed on CUDA (the same bits as every CPU that passes the suite);
3. an archive made on the CPU decodes on CUDA and one made on CUDA decodes
   on the CPU, and the two archives are byte-identical;
4. compression and decompression KB/s on each device (tiny models: these
   measure overheads, not the default model's speed).
Exit status 0 only if every check passed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("LLMPIPE_CACHE", tempfile.mkdtemp(prefix="llmpipe-device-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llmpipe.codec.frequencies import frequency_tables  # noqa: E402
from llmpipe.engine.exact_transformer import ExactTransformer  # noqa: E402
from llmpipe.engine.exact_weights import prepare_exact_weights  # noqa: E402
from llmpipe.models import cache  # noqa: E402
from llmpipe.pipeline.compress import Compressor  # noqa: E402
from llmpipe.pipeline.decompress import Decompressor  # noqa: E402
from tests.engine.test_exact_transformer import PINNED_TABLES_SHA256, _integer_seeded_model  # noqa: E402
from tests.tiny_model import COMMITTED, DATA, build_tiny_model  # noqa: E402

ARCHITECTURES = ("llama", "gpt_neox", "gpt2")


def _logits(network: ExactTransformer, tokens: torch.Tensor, step: bool) -> torch.Tensor:
    cache_ = network.new_cache(*tokens.shape)
    with torch.inference_mode():
        if not step:
            return network.forward(tokens, cache_)
        return torch.cat([network.forward(tokens[:, p : p + 1], cache_) for p in range(tokens.shape[1])], dim=1)


def check_tables(model, seed: int, second: str) -> dict:
    weights = prepare_exact_weights(model.config, model.weights)
    cpu, gpu = ExactTransformer(model.config, weights, "cpu"), ExactTransformer(model.config, weights, second)
    tokens = torch.randint(0, model.config.vocab_size, (64, 80), generator=torch.Generator().manual_seed(seed))
    on_cpu = frequency_tables(_logits(cpu, tokens, step=False).reshape(-1, model.config.vocab_size), 256)
    on_gpu = frequency_tables(_logits(gpu, tokens, step=False).reshape(-1, model.config.vocab_size), 256)
    stepped = _logits(gpu, tokens[20:27], step=True).reshape(-1, model.config.vocab_size)
    return {
        "seed": seed,
        "cpu_full_equals_device_full": torch.equal(on_cpu, on_gpu),
        "device_incremental_batch7_equals_cpu": torch.equal(frequency_tables(stepped, 256), on_cpu[20 * 80 : 27 * 80]),
    }


def check_pinned(arch: str, second: str) -> dict:
    config, weights = _integer_seeded_model(arch)
    network = ExactTransformer(config, prepare_exact_weights(config, weights), second)
    tokens = torch.from_numpy(np.random.Generator(np.random.PCG64(7)).integers(0, 97, size=(2, 200)))
    freq = frequency_tables(_logits(network, tokens, step=False).reshape(400, -1), 256).to(torch.int64).numpy()
    digest = hashlib.sha256(freq.astype("<i8").tobytes()).hexdigest()
    return {"device_digest_equals_pinned": digest == PINNED_TABLES_SHA256[arch]}


def check_archives(model, text: bytes, second: str) -> dict:
    result = {}
    archives = {}
    for device in ("cpu", second):
        compressor = Compressor(model, chunk_size=2048, batch=4, threads=2, device=device)
        started = time.perf_counter()
        archives[device] = compressor.compress(text)
        result[f"compress_kb_s_{device}"] = round(len(text) / 1000 / (time.perf_counter() - started), 2)
    result["archives_identical"] = archives["cpu"] == archives[second]
    result["bytes_in"], result["bytes_out"] = len(text), len(archives["cpu"])
    for made, decoded_on in (("cpu", second), (second, "cpu")):
        started = time.perf_counter()
        try:
            ok = Decompressor(model, device=decoded_on).decompress(archives[made]) == text
        except Exception as exc:  # reported, not raised: the other checks still run
            ok = f"{type(exc).__name__}: {exc}"
        result[f"made_on_{made}_decodes_on_{decoded_on}"] = ok
        result[f"decompress_kb_s_{decoded_on}"] = round(len(text) / 1000 / (time.perf_counter() - started), 2)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("cross_decode.json"))
    parser.add_argument("--bytes", type=int, default=8192, help="text per archive check")
    parser.add_argument("--second-device", default="cuda", help="compared with the CPU (default cuda)")
    args = parser.parse_args()
    second = args.second_device  # "cpu" dry-runs the script on a machine without a GPU
    if second.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device here: nothing to check", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name() if second.startswith("cuda") else None
    report = {"second_device": second, "gpu": gpu, "torch": torch.__version__, "architectures": {}}
    text = (DATA / "alice_chapter1.txt").read_bytes()[: args.bytes]
    build_dir = Path(tempfile.mkdtemp(prefix="tiny-models-"))
    for arch in ARCHITECTURES:
        started = time.perf_counter()
        source = COMMITTED if arch == "llama" else build_tiny_model(build_dir / arch, arch=arch)
        model = cache.load(str(source))
        entry = {"tables": check_tables(model, int(time.time()) % 100000, second), **check_pinned(arch, second)}
        entry["archives"] = check_archives(model, text, second)
        entry["seconds"] = round(time.perf_counter() - started, 1)
        report["architectures"][arch] = entry
        print(arch, json.dumps(entry), flush=True)
    checks = [
        value
        for entry in report["architectures"].values()
        for value in (*entry["tables"].values(), entry["device_digest_equals_pinned"], *entry["archives"].values())
        if isinstance(value, (bool, str))  # a failed decode is reported as its error message
    ]
    report["all_passed"] = all(value is True for value in checks)
    args.out.write_text(json.dumps(report, indent=1))
    print("all passed" if report["all_passed"] else "SOME CHECKS FAILED", flush=True)
    return 0 if report["all_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
