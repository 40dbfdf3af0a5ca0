import torch

from llmpipe.models.llama import Llama


def test_matches_transformers_full_and_incremental(tiny_model, tiny_model_dir):
    from transformers import LlamaForCausalLM

    reference = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ours = Llama(tiny_model.config, tiny_model.weights, torch.float32)
    tokens = torch.randint(0, tiny_model.config.vocab_size, (3, 50))
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
    ours = Llama(tiny_model.config, tiny_model.weights, torch.float32)
    try:
        ours.new_cache(1, tiny_model.config.max_position_embeddings + 1)
    except ValueError:
        return
    raise AssertionError("expected ValueError")
