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
