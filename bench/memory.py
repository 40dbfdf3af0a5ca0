"""Memory measured against the plan: preparing exact int8 weights, loading engines, coding.

    python bench/memory.py --name memory [--config openlm-research/open_llama_7b] [--layers N]

Builds a random-initialised model from a real configuration (float16, the
dtype such checkpoints ship in) straight into a scratch model cache, then runs
each step in a fresh process and samples its resident memory every 10 ms:

* ``prepare``: derive the exact engine's int8 weights from the float16 cache
  (issue 7: at most about 1.5x the int8 size);
* ``load``: build the exact engine from the prepared file;
* ``code``: compress a slice of text with a reduced model (the same
  configuration cut to ``--code-layers`` layers) through each engine, and
  compare the growth of memory with ``llmpipe models --plan``'s total.

Memory is reported as the peak of anonymous memory (what a run takes from
the machine) and of the whole resident set (which also counts pages of the
memory-mapped weight files, reclaimable page cache), each above the process's
baseline after imports. Results go to ``bench/results/<name>.json`` and into
BENCHMARKS.md through ``bench/bench.py report``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from bench.common import save  # noqa: E402
from llmpipe.models.config import ModelConfig  # noqa: E402
from llmpipe.models.known import known_config  # noqa: E402

TEXT = ROOT / "tests" / "data" / "alice_chapter1.txt"
TOKENIZER = ROOT / "tests" / "data" / "tiny-llama" / "tokenizer.json"


class PeakMemory:
    """Samples this process's anonymous and total resident memory (Linux ``/proc/self/status``)."""

    def __init__(self) -> None:
        self.baseline = self._read()
        self.peak = dict(self.baseline)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    @staticmethod
    def _read() -> dict[str, int]:
        fields = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "VmRSS"):
                fields[key] = int(value.split()[0]) * 1024
        return fields

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            for key, value in self._read().items():
                self.peak[key] = max(self.peak[key], value)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        for key, value in self._read().items():
            self.peak[key] = max(self.peak[key], value)
        return {
            "anon_bytes": self.peak["RssAnon"] - self.baseline["RssAnon"],
            "rss_bytes": self.peak["VmRSS"] - self.baseline["VmRSS"],
        }


def reduced_config(config_name: str, layers: int | None) -> ModelConfig:
    """A known configuration, cut to ``layers`` layers when given (every tensor keeps its full size)."""
    config = known_config(config_name)
    return ModelConfig.from_dict({**config.to_dict(), "num_hidden_layers": layers}) if layers else config


def random_weights(config: ModelConfig, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Canonical float16 Llama weights, N(0, 0.02) with unit norms, seeded (generated on ``device``, kept on
    the CPU)."""
    if config.arch != "llama":
        raise SystemExit("random_weights builds Llama-style models only (the big study models are Llamas)")
    generator = torch.Generator(device).manual_seed(0)
    c, inner, hd = config.hidden_size, config.intermediate_size, config.head_dim
    shapes = {"model.embed_tokens.weight": (config.vocab_size, c), "model.norm.weight": (c,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, c)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (c,),
            p + "post_attention_layernorm.weight": (c,),
            p + "self_attn.q_proj.weight": (config.num_attention_heads * hd, c),
            p + "self_attn.k_proj.weight": (config.num_key_value_heads * hd, c),
            p + "self_attn.v_proj.weight": (config.num_key_value_heads * hd, c),
            p + "self_attn.o_proj.weight": (c, config.num_attention_heads * hd),
            p + "mlp.gate_proj.weight": (inner, c),
            p + "mlp.up_proj.weight": (inner, c),
            p + "mlp.down_proj.weight": (c, inner),
        }
    weights = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            weights[name] = torch.ones(shape, dtype=torch.float16)
        else:
            sample = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
            weights[name] = sample.mul_(0.02).to("cpu", torch.float16)
    return weights


def build_random_model(config_name: str, layers: int | None, target: Path) -> Path:
    """A float16 model with ``config_name``'s architecture (cut to ``layers``), written as a cache entry."""
    from llmpipe.models.cache import weights_hash
    from llmpipe.tokenization import ByteTokenizer

    config = reduced_config(config_name, layers)
    weights = random_weights(config)
    target.mkdir(parents=True)
    save_file(weights, str(target / "model.safetensors"))
    (target / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
    shutil.copy(TOKENIZER, target / "tokenizer.json")
    tokenizer = ByteTokenizer(target / "tokenizer.json", config.vocab_size)
    meta = {
        "name": f"random-{config_name.split('/')[-1]}-{config.num_hidden_layers}l",
        "source": f"random init of {config_name}",
        "arch": config.arch,
        "weights_sha256": weights_hash(weights),
        "tokenizer_sha256": tokenizer.sha256,
    }
    (target / "llmpipe.json").write_text(json.dumps(meta, indent=1))
    return target


def step_prepare(directory: str) -> dict:
    from llmpipe.engine.exact_engine import _exact_weights
    from llmpipe.models import cache

    model = cache.load(directory)
    meter = PeakMemory()
    started = time.perf_counter()
    prepared = _exact_weights(model)
    seconds = time.perf_counter() - started
    int8_file = next(Path(directory).glob("exact-v*.safetensors")).stat().st_size
    del prepared
    return {"int8_file_bytes": int8_file, "seconds": seconds, **meter.stop()}


def step_load(directory: str) -> dict:
    from llmpipe.engine.exact_engine import ExactEngine
    from llmpipe.models import cache

    model = cache.load(directory)
    meter = PeakMemory()
    started = time.perf_counter()
    engine = ExactEngine(model, threads=2)
    seconds = time.perf_counter() - started
    del engine
    return {"seconds": seconds, **meter.stop()}


def step_code(directory: str, numerics: str, dtype: str, load_in_8bit: bool, batch: int, size: int) -> dict:
    from llmpipe.models import cache
    from llmpipe.pipeline.compress import Compressor

    model = cache.load(directory)
    data = TEXT.read_bytes()[:size]
    plan_lines: list[str] = []
    meter = PeakMemory()
    compressor = Compressor(
        model,
        chunk_size=max(256, size // batch),
        batch=batch,
        numerics=numerics,
        dtype=dtype,
        load_in_8bit=load_in_8bit,
        log=plan_lines.append,
    )
    started = time.perf_counter()
    archive = compressor.compress(data)
    seconds = time.perf_counter() - started
    total = next(line for line in plan_lines if line.removeprefix("plan: ").strip().startswith("total on"))
    return {
        "plan_bytes": int(float(total.split()[-2]) * 2**30),
        "archive_bytes": len(archive),
        "bytes": len(data),
        "seconds": seconds,
        **meter.stop(),
    }


def run_step(*args: str) -> dict:
    """One step in a fresh process, so that each peak starts from the same baseline."""
    done = subprocess.run(
        [sys.executable, __file__, "--step", *args], capture_output=True, text=True, cwd=ROOT, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"step {args} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


STEPS = {"prepare": step_prepare, "load": step_load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="memory")
    parser.add_argument("--config", default="openlm-research/open_llama_7b")
    parser.add_argument("--layers", type=int, default=None, help="cut the model to this many layers")
    parser.add_argument("--code-layers", type=int, default=2, help="layers of the model the coding runs use")
    parser.add_argument("--code-bytes", type=int, default=2048)
    parser.add_argument("--step", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        kind, directory, *rest = args.step
        if kind == "code":
            numerics, dtype, load_in_8bit, batch, size = rest
            result = step_code(directory, numerics, dtype, load_in_8bit == "1", int(batch), int(size))
        else:
            result = STEPS[kind](directory)
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory(prefix="llmpipe-memory-") as scratch:
        started = time.perf_counter()
        big = build_random_model(args.config, args.layers, Path(scratch) / "big")
        print(f"built {big} in {time.perf_counter() - started:.0f} s", flush=True)
        prepare = run_step("prepare", str(big))
        print("prepare", prepare, flush=True)
        load = run_step("load", str(big))
        print("load", load, flush=True)
        shutil.rmtree(big)
        small = build_random_model(args.config, args.code_layers, Path(scratch) / "small")
        run_step("prepare", str(small))  # the coding runs measure the steady state, not the first run
        coding = []
        for numerics, dtype, load_in_8bit in [
            ("exact", "float32", "0"),
            ("float", "float32", "0"),
            ("float", "float16", "0"),
            ("float", "float32", "1"),
        ]:
            result = run_step("code", str(small), numerics, dtype, load_in_8bit, "4", str(args.code_bytes))
            result |= {"numerics": numerics, "dtype": dtype, "load_in_8bit": load_in_8bit == "1", "batch": 4}
            print("code", result, flush=True)
            coding.append(result)
    config = known_config(args.config)
    save(
        args.name,
        {
            "kind": "memory",
            "model": f"random {args.config} ({args.layers or config.num_hidden_layers} layers), float16",
            "numerics": "exact",
            "config": args.config,
            "layers": args.layers or config.num_hidden_layers,
            "prepare": prepare,
            "load": load,
            "code_layers": args.code_layers,
            "coding": coding,
        },
    )


if __name__ == "__main__":
    main()
