"""The memory plan: its exact parts equal what the engines allocate; the CLI answers from configs alone."""

import pytest
import torch

from llmpipe.engine.exact_transformer import ExactTransformer
from llmpipe.engine.exact_weights import prepare_exact_weights
from llmpipe.models import cache
from llmpipe.models.known import known_config
from llmpipe.pipeline.plan import parameter_count, plan_memory
from tests.cli.test_cli import run
from tests.conftest import ARCHITECTURES


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_exact_parts_are_the_allocated_sizes(tiny_models, arch):
    model = tiny_models[arch]
    config = model.config
    plan = plan_memory(config, batch=5, positions=77, device="cpu")
    cache = ExactTransformer(config, prepare_exact_weights(config, model.weights)).new_cache(5, 77)
    kv = sum(t.numel() * t.element_size() for t in (cache.keys, cache.values, cache.key_scales, cache.value_scales))
    assert plan.parts["KV cache"] == kv
    prepared = prepare_exact_weights(config, model.weights)
    held = sum(t.numel() * t.element_size() for t in prepared.values())
    assert plan.parts["weights, int8 + scales"] == held
    canonical = sum(t.numel() for name, t in model.weights.items() if name.endswith("weight") and t.dim() == 2)
    assert parameter_count(config) == canonical


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("load_in_8bit", [False, True])
def test_float_weights_and_cache_are_the_allocated_sizes(tiny_models, arch, dtype, load_in_8bit):
    """The float engine's weights (dense or int8 through bitsandbytes) and KV cache, as planned."""
    from llmpipe.engine.float_engine import DTYPES
    from llmpipe.models.transformer import Transformer

    model = tiny_models[arch]
    plan = plan_memory(model.config, numerics="float", dtype=dtype, load_in_8bit=load_in_8bit, batch=3, positions=50)
    network = Transformer(model.config, model.weights, DTYPES[dtype], load_in_8bit=load_in_8bit)
    held = {id(t): t for t in (network.embed, network.positions, network.lm_head.weight) if t is not None}
    for layer in network.layers:
        for part in layer.values():
            if isinstance(part, torch.Tensor):
                continue  # norms: left out of the plan (under 0.1% of any supported model)
            if part is not None:
                held[id(part.weight)] = part.weight
                scales = getattr(part.weight, "SCB", None)  # bitsandbytes' row scales
                if scales is not None:
                    held[id(scales)] = scales
    weights = next(size for name, size in plan.parts.items() if name.startswith("weights"))
    assert weights == sum(t.numel() * t.element_size() for t in held.values())
    cache = network.new_cache(3, 50)
    assert plan.parts["KV cache"] == sum(t.numel() * t.element_size() for t in (cache.keys, cache.values))


def test_batch_advice_fits_the_limit():
    config = known_config("openlm-research/open_llama_7b")
    plan = plan_memory(config, batch=64, positions=1024, limit=16 << 30, device="cuda", row_symbols=10000)
    assert not plan.fits() and "mixer history and adaptive bias" in plan.host_parts
    advised = plan_memory(config, batch=plan.largest_batch(), positions=1024, limit=16 << 30, device="cuda")
    assert advised.fits()
    assert not plan_memory(config, batch=plan.largest_batch() + 1, positions=1024, limit=16 << 30, device="cuda").fits()


def test_plan_command_needs_no_weights():
    done = run(["models", "--plan", "openlm-research/open_llama_7b", "-M", "16GB", "--device", "cuda", "-b", "64"])
    assert done.returncode == 1, done.stderr
    last = done.stdout.decode().strip().splitlines()[-1]
    assert last.startswith("fits: NO") and "--batch 17 fits" in last
    done = run(["models", "--plan", "EleutherAI/pythia-70m", "-b", "8"])
    assert done.returncode == 0 and b"gpt_neox, 70M parameters" in done.stdout
    done = run(["models", "--plan", "no/such-model"])
    assert done.returncode == 1 and done.stderr.count(b"\n") == 1 and b"no configuration known" in done.stderr


@pytest.mark.parametrize(
    "options, batch",
    [
        (["--numerics", "float", "--dtype", "float16", "--load-in-8bit"], 9),
        (["--numerics", "float", "--dtype", "float16"], 3),  # float16 weights leave room for 3 rows
        ([], 17),  # exact: int8 weights, int8 keys and values
    ],
)
def test_open_llama_7b_on_a_16_gb_gpu(options, batch):
    """Issue 7: the default batch of each way to run OpenLLaMA-7B on a 16 GB GPU, from the configuration (at the
    default context window of 2,048 positions)."""
    base = ["models", "--plan", "openlm-research/open_llama_7b", "-M", "16G", "--device", "cuda"]
    done = run([*base, *options])
    lines = done.stdout.decode().strip().splitlines()
    assert done.returncode == 0 and f"batch {batch} x 2048 positions" in lines[0]
    assert lines[-1].startswith("fits: yes")
    assert run([*base, *options, "-b", str(batch + 1)]).returncode == 1


@pytest.mark.parametrize(
    "model", ["EleutherAI/pythia-70m", "EleutherAI/pythia-160m", "gpt2", "openlm-research/open_llama_3b", "default"]
)
@pytest.mark.parametrize(
    "options", [["--numerics", "float", "--dtype", "float16"], ["--numerics", "float", "--load-in-8bit"]]
)
def test_every_study_model_has_a_plan(model, options):
    done = run(["models", "--plan", model, "-M", "16G", "--device", "cuda", *options])
    assert done.returncode == 0 and done.stdout.decode().strip().splitlines()[-1].startswith("fits: yes")


def test_list_and_remove(tiny_models, tiny_model_dirs):
    listed = run(["models"]).stdout.decode()
    assert "gpt_neox" in listed and "gpt2" in listed
    name = tiny_models["gpt2"].name
    assert run(["models", "--remove", name]).returncode == 0
    assert "gpt2 " not in run(["models"]).stdout.decode()
    assert run(["models", "--remove", name]).returncode == 1
    restored = run(["fetch", str(tiny_model_dirs["gpt2"])])  # prepares it again
    assert restored.returncode == 0, restored.stderr
    again = cache.load(str(tiny_model_dirs["gpt2"])).weights["model.embed_tokens.weight"]
    assert torch.equal(again, tiny_models["gpt2"].weights["model.embed_tokens.weight"])
