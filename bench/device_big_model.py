"""On a GPU machine with no network: OpenLLaMA-7B-sized coding with both engines (issue 7, part 6).

    PYTHONPATH=/tmp/site:. python3 bench/device_big_model.py --out "$OUT/big_model.json"

Builds a random-initialised model with the OpenLLaMA-7B configuration in
float16 (seeded, in memory: nothing is downloaded), then for each way to run
it (exact int8 numerics, float16, float16 with LLM.int8 weights):

* prepares the engine on the GPU and codes ``--rows`` rows of ``--tokens``
  symbols each (real text through the test tokenizer) with the codec itself,
  encoder then decoder, and checks the decoded symbols equal the input.
  The codec is driven directly because a random model predicts text worse
  than zstd, so the compressor would (rightly) store zstd blocks and never
  run the model;
* reports the seconds of each direction, tokens per second and the KB/s
  they mean at 4 bytes per token (about what Llama's tokenizer gives on
  English), the peak GPU memory, and the memory plan's total for the same
  settings;
* for exact numerics, decodes on the CPU a short payload made on the GPU,
  and checks the CPU encoder makes the identical payload (cross-decoding).

Random weights give uniform-ish predictions, so the sizes say nothing about
compression; the point is memory, speed and exactness at full scale. It
stops starting new parts once ``--budget`` seconds have passed, and always
writes what it measured. ``--layers 1 --device cpu`` dry-runs it on a CPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.memory import TEXT, TOKENIZER, random_weights, reduced_config  # noqa: E402
from llmpipe.codec import mixer  # noqa: E402
from llmpipe.codec.coder import LlmCoder  # noqa: E402
from llmpipe.codec.context import ContextWindow  # noqa: E402
from llmpipe.engine import create_engine  # noqa: E402
from llmpipe.models.cache import LoadedModel  # noqa: E402
from llmpipe.pipeline.plan import plan_memory  # noqa: E402
from llmpipe.tokenization import ByteTokenizer  # noqa: E402

BYTES_PER_TOKEN = 4.0
"""What Llama's 32k tokenizer gives on English text, to turn tokens/s into KB/s."""
THREADS = min(16, os.cpu_count() or 1)
SETTINGS = [("exact", "float32", False), ("float", "float16", False), ("float", "float16", True)]


def symbol_rows(tokenizer: ByteTokenizer, rows: int, tokens: int) -> list[list[int]]:
    """``rows`` rows of ``tokens`` symbols of real text (the test text, repeated)."""
    text = (ROOT / "tests" / "data" / "enwik8_page.xml").read_bytes() + TEXT.read_bytes()
    symbols = tokenizer.encode(text)
    stream = (symbols * (rows * tokens // len(symbols) + 1))[: rows * tokens]
    return [stream[r * tokens : (r + 1) * tokens] for r in range(rows)]


def memory_now(device: str) -> dict:
    if device == "cpu":
        return {}
    return {"peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def code_with(model: LoadedModel, setting: tuple, rows: list[list[int]], device: str) -> dict:
    numerics, dtype, load_in_8bit = setting
    if device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    engine = create_engine(numerics, model, THREADS, len(rows), device, dtype, load_in_8bit)
    result = {"engine_seconds": round(time.perf_counter() - started, 1)}
    coder = LlmCoder(engine, model.tokenizer)
    context = ContextWindow()
    started = time.perf_counter()
    encoded = coder.encode_group(rows, context, mixer_version=mixer.VERSION)
    encode = time.perf_counter() - started
    started = time.perf_counter()
    decoded = coder.decode_group(encoded.payloads, [len(r) for r in rows], context, mixer_version=mixer.VERSION)
    decode = time.perf_counter() - started
    tokens = sum(len(r) for r in rows)
    plan = plan_memory(
        model.config,
        numerics=numerics,
        dtype=dtype,
        load_in_8bit=load_in_8bit,
        batch=len(rows),
        positions=max(len(r) for r in rows) + 1,
        row_symbols=max(len(r) for r in rows),
        device="cpu" if device == "cpu" else "cuda",
    )
    result |= {
        "round_trip": decoded == rows,
        "tokens": tokens,
        "encode_seconds": round(encode, 1),
        "decode_seconds": round(decode, 1),
        "encode_tokens_s": round(tokens / encode, 1),
        "decode_tokens_s": round(tokens / decode, 1),
        "encode_kb_s_at_4_bytes_per_token": round(tokens * BYTES_PER_TOKEN / 1024 / encode, 2),
        "decode_kb_s_at_4_bytes_per_token": round(tokens * BYTES_PER_TOKEN / 1024 / decode, 2),
        "plan_gib": round(plan.total / 2**30, 2),
        **memory_now(device),
    }
    if numerics == "exact":  # on a CPU-only dry run this compares the CPU with itself
        result["cross_decode"] = cross_decode(model, coder, rows)
    del engine, coder
    gc.collect()
    if device != "cpu":
        torch.cuda.empty_cache()
    return result


def cross_decode(model: LoadedModel, gpu_coder: LlmCoder, rows: list[list[int]]) -> dict:
    """A short exact payload made on the GPU decodes on the CPU; the CPU encoder makes the same bytes."""
    short = [row[:24] for row in rows[:2]]
    context = ContextWindow()
    made_on_gpu = gpu_coder.encode_group(short, context, mixer_version=mixer.VERSION).payloads
    cpu_coder = LlmCoder(create_engine("exact", model, THREADS, 2, "cpu"), model.tokenizer)
    started = time.perf_counter()
    made_on_cpu = cpu_coder.encode_group(short, context, mixer_version=mixer.VERSION).payloads
    decoded_on_cpu = cpu_coder.decode_group(made_on_gpu, [len(r) for r in short], context, mixer_version=mixer.VERSION)
    return {
        "payloads_identical": made_on_cpu == made_on_gpu,
        "gpu_payload_decodes_on_cpu": decoded_on_cpu == short,
        "cpu_seconds": round(time.perf_counter() - started, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("big_model.json"))
    parser.add_argument("--config", default="openlm-research/open_llama_7b")
    parser.add_argument("--layers", type=int, default=None, help="cut the model (dry runs)")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=1024, help="symbols per row (16 x 1024 x 4 B: 64 KB)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget", type=float, default=420, help="start no new part after this many seconds")
    args = parser.parse_args()
    if args.device != "cpu" and not torch.cuda.is_available():
        print("no CUDA device here (use --device cpu --layers 1 to dry-run)", file=sys.stderr)
        return 2
    began = time.perf_counter()
    config = reduced_config(args.config, args.layers)
    report: dict = {
        "config": args.config,
        "layers": config.num_hidden_layers,
        "device": torch.cuda.get_device_name() if args.device != "cpu" else "cpu",
        "torch": torch.__version__,
        "rows": args.rows,
        "tokens_per_row": args.tokens,
        "results": {},
    }
    weights = random_weights(config, args.device)
    report["build_seconds"] = round(time.perf_counter() - began, 1)
    print(f"built {config.num_hidden_layers} layers in {report['build_seconds']} s", flush=True)
    tokenizer = ByteTokenizer(TOKENIZER, config.vocab_size)
    with tempfile.TemporaryDirectory(prefix="llmpipe-big-") as scratch:
        model = LoadedModel(
            name=f"random-{args.config.split('/')[-1]}",
            config=config,
            weights=weights,
            tokenizer=tokenizer,
            weights_sha256=f"random-seed-0-{config.num_hidden_layers}-layers",
            load_seconds=0.0,
            directory=Path(scratch),  # where the exact engine keeps its int8 weights
        )
        rows = symbol_rows(tokenizer, args.rows, args.tokens)
        for setting in SETTINGS:
            label = setting[0] if setting[0] == "exact" else f"float {setting[1]}" + (" 8-bit" if setting[2] else "")
            if time.perf_counter() - began > args.budget:
                report["results"][label] = "skipped: over the time budget"
                continue
            try:
                report["results"][label] = code_with(model, setting, rows, args.device)
            except Exception as exc:  # reported; the other settings still run
                report["results"][label] = f"{type(exc).__name__}: {exc}"
            print(label, json.dumps(report["results"][label]), flush=True)
            args.out.write_text(json.dumps(report, indent=1))
    report["seconds"] = round(time.perf_counter() - began, 1)
    checks = [
        value
        for result in report["results"].values()
        if isinstance(result, dict)
        for value in (result["round_trip"], *result.get("cross_decode", {}).values())
        if isinstance(value, bool)
    ]
    report["all_passed"] = bool(checks) and all(checks) and all(isinstance(r, dict) for r in report["results"].values())
    args.out.write_text(json.dumps(report, indent=1))
    print("all passed" if report["all_passed"] else "NOT ALL PASSED", flush=True)
    return 0 if report["all_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
