"""The float forward pass matches transformers' for each architecture: full, incremental and split."""

import pytest
import torch

from llmpipe.models.transformer import Transformer
from tests.conftest import ARCHITECTURES


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_matches_transformers_full_and_incremental(arch, tiny_models, tiny_model_dirs):
    from transformers import AutoModelForCausalLM

    model = tiny_models[arch]
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[arch], dtype=torch.float32).eval()
    ours = Transformer(model.config, model.weights, torch.float32)
    tokens = torch.randint(0, model.config.vocab_size, (3, 50))
    with torch.inference_mode():
        expected = reference(tokens).logits
        full = ours.forward(tokens, ours.new_cache(3, 50))
        cache = ours.new_cache(3, 50)
        incremental = torch.cat([ours.forward(tokens[:, i : i + 1], cache) for i in range(50)], dim=1)
        cache = ours.new_cache(3, 50)
        split = torch.cat([ours.forward(tokens[:, :21], cache), ours.forward(tokens[:, 21:], cache)], dim=1)
    for logits in (full, incremental, split):
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_cache_refuses_more_positions_than_the_model_has(tiny_model):
    ours = Transformer(tiny_model.config, tiny_model.weights, torch.float32)
    with pytest.raises(ValueError):
        ours.new_cache(1, tiny_model.config.max_position_embeddings + 1)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize(
    "dtype, load_in_8bit, tolerance",
    [
        (torch.float16, False, 0.05),
        (torch.bfloat16, False, 0.3),
        (torch.float32, True, 0.3),
        (torch.float16, True, 0.3),
    ],
)
def test_lower_precisions_stay_close_to_float32(arch, tiny_models, dtype, load_in_8bit, tolerance):
    """float16/bfloat16 weights and LLM.int8 weights give logits within a small distance of float32's, and
    incremental steps agree with the full pass (the lockstep schedule the coder uses)."""
    model = tiny_models[arch]
    reference = Transformer(model.config, model.weights, torch.float32)
    ours = Transformer(model.config, model.weights, dtype, load_in_8bit=load_in_8bit)
    if load_in_8bit:
        assert ours.layers[0]["q"].weight.dtype == torch.int8
        assert ours.layers[0]["down"].weight.dtype == torch.int8
    tokens = torch.randint(0, model.config.vocab_size, (2, 30))
    with torch.inference_mode():
        expected = reference.forward(tokens, reference.new_cache(2, 30))
        full = ours.forward(tokens, ours.new_cache(2, 30))
        cache = ours.new_cache(2, 30)
        incremental = torch.cat([ours.forward(tokens[:, i : i + 1], cache) for i in range(30)], dim=1)
    assert full.dtype == torch.float32
    assert 0 < (full - expected).abs().max() < tolerance * expected.std()
    assert (incremental - full).abs().max() < tolerance * expected.std()
