"""The exact Llama: identical numbers whatever the schedule, close to float32, pinned bit for bit."""

import hashlib
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmpipe.coder.frequencies import frequency_tables
from llmpipe.engine.exact_llama import ExactLlama, prepare_exact_weights
from llmpipe.models.llama import Llama, LlamaConfig
from tests.tiny_model import DATA


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return tiny_model, ExactLlama(tiny_model.config, prepare_exact_weights(tiny_model.config, tiny_model.weights))


def _tokens(seed: int, rows: int, length: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))


def _full(llama: ExactLlama, tokens: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return llama.forward(tokens, llama.new_cache(*tokens.shape))


def _incremental(llama: ExactLlama, tokens: torch.Tensor) -> torch.Tensor:
    cache = llama.new_cache(*tokens.shape)
    steps = []
    with torch.inference_mode():
        for p in range(tokens.shape[1]):
            steps.append(llama.forward(tokens[:, p : p + 1], cache))
    return torch.cat(steps, dim=1)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), length=st.integers(2, 90))
def test_same_numbers_whatever_the_schedule(tiny, seed, length):
    """Full sequence at batch 64 and 2 threads == incremental at batch 7 == alone at batch 1 and 1 thread,
    from contiguous or strided token tensors (fresh random inputs on every run)."""
    model, llama = tiny
    tokens = _tokens(seed, 64, length, model.config.vocab_size)
    reference = _full(llama, tokens)  # batch 64
    assert torch.equal(_incremental(llama, tokens[10:17]), reference[10:17])  # batch 7, KV cache
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        strided = tokens.t().contiguous().t()[40:41]  # the same row through a non-contiguous view
        assert not strided.is_contiguous()
        assert torch.equal(_full(llama, strided), reference[40:41])  # batch 1
    finally:
        torch.set_num_threads(threads)
    tables = frequency_tables(reference[5], 256)
    assert torch.equal(tables, frequency_tables(_full(llama, tokens[5:6])[0], 256))


def test_incremental_equals_full_sequence_past_several_query_blocks(tiny):
    model, llama = tiny
    tokens = _tokens(0, 2, 300, model.config.vocab_size)
    assert torch.equal(_incremental(llama, tokens), _full(llama, tokens))


def test_close_to_float32(tiny):
    model, llama = tiny
    ids = model.tokenizer.encode((DATA / "alice_chapter1.txt").read_bytes()[:3000])
    tokens = torch.tensor([[model.tokenizer.prime_token] + ids[:-1]])
    targets = torch.tensor(ids)
    exact = _full(llama, tokens)[0]
    with torch.inference_mode():
        flt = Llama(model.config, model.weights, torch.float32)
        reference = flt.forward(tokens, flt.new_cache(1, tokens.shape[1]))[0]

    def bits(logits):
        return -torch.log_softmax(logits.double(), -1)[torch.arange(len(ids)), targets].sum().item() / np.log(2)

    assert abs(bits(exact) / bits(reference) - 1) < 0.01  # measured +0.36% on the default model


def _integer_seeded_model() -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """A small Llama whose float weights come from integers (PCG64), so every machine builds the same one."""
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=8,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    generator = np.random.Generator(np.random.PCG64(2026))
    c, inner, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * config.head_dim

    def ints(*shape: int) -> torch.Tensor:
        return torch.from_numpy((generator.integers(-1024, 1025, size=shape) / 8192).astype(np.float32))

    weights = {"model.embed_tokens.weight": ints(config.vocab_size, c) * 8, "model.norm.weight": 1 + ints(c)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        weights |= {
            p + "input_layernorm.weight": 1 + ints(c),
            p + "post_attention_layernorm.weight": 1 + ints(c),
            p + "self_attn.q_proj.weight": ints(c, c),
            p + "self_attn.k_proj.weight": ints(kv, c),
            p + "self_attn.v_proj.weight": ints(kv, c),
            p + "self_attn.o_proj.weight": ints(c, c),
            p + "mlp.gate_proj.weight": ints(inner, c),
            p + "mlp.up_proj.weight": ints(inner, c),
            p + "mlp.down_proj.weight": ints(c, inner),
        }
    return config, weights


PINNED_TABLES_SHA256 = "bc19b5e6ea92035a147c6f7a1dd6ebafcaa62d80459a0b64c7369c52fcbb7f98"


def test_frequency_tables_are_pinned():
    """Exact numerics v1 on a model every machine builds identically: any change here breaks old archives.

    Regenerate (only together with a new numerics version) with GENERATE_EXPECTED=1.
    """
    config, weights = _integer_seeded_model()
    llama = ExactLlama(config, prepare_exact_weights(config, weights))
    tokens = torch.from_numpy(np.random.Generator(np.random.PCG64(7)).integers(0, 97, size=(2, 200)))
    freq = frequency_tables(_full(llama, tokens).reshape(400, -1), 256).to(torch.int64).numpy()
    digest = hashlib.sha256(freq.astype("<i8").tobytes()).hexdigest()
    if os.environ.get("GENERATE_EXPECTED"):
        print(f"\nPINNED_TABLES_SHA256 = {digest!r}")
        return
    assert digest == PINNED_TABLES_SHA256


def test_prepared_weights_are_cached_and_a_damaged_copy_is_replaced(tiny_model):
    from llmpipe.engine.exact_engine import _exact_weights

    first = _exact_weights(tiny_model)
    stored = next(tiny_model.directory.glob("exact-v*.safetensors"))
    data = bytearray(stored.read_bytes())
    data[-5] ^= 0x40  # flip a bit inside the last tensor
    stored.write_bytes(bytes(data))
    again = _exact_weights(tiny_model)
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert _exact_weights(tiny_model).keys() == first.keys()
