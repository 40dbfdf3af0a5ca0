"""The exact transformer (Llama, GPT-NeoX, GPT-2): identical numbers whatever the schedule, close to float32,
pinned bit for bit."""

import hashlib
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmpipe.codec.frequencies import frequency_tables
from llmpipe.engine.exact_transformer import ExactTransformer
from llmpipe.engine.exact_weights import fixed_point_dot, prepare_exact_weights
from llmpipe.models.config import ModelConfig
from llmpipe.models.transformer import Transformer
from tests.conftest import ARCHITECTURES
from tests.tiny_model import DATA


@pytest.fixture(scope="module", params=ARCHITECTURES)
def tiny(request, tiny_models):
    model = tiny_models[request.param]
    return model, ExactTransformer(model.config, prepare_exact_weights(model.config, model.weights))


def _tokens(seed: int, rows: int, length: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))


def _full(llama: ExactTransformer, tokens: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return llama.forward(tokens, llama.new_cache(*tokens.shape))


def _incremental(llama: ExactTransformer, tokens: torch.Tensor) -> torch.Tensor:
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


def test_a_decoding_steps_layers_in_one_call_give_the_same_numbers(tiny):
    """Steps of a few rows run their layers in one compiled call where the model is Llama-shaped
    (``decode_layers``): the numbers of the kernel-by-kernel step and of the full sequence."""
    model, llama = tiny
    tokens = _tokens(3, 3, 40, model.config.vocab_size)
    reference = _full(llama, tokens)
    fused = llama._decode_layers
    assert (fused is not None) == (model.config.arch == "llama" and llama.kernels is not None)
    assert torch.equal(_incremental(llama, tokens), reference)
    llama._decode_layers = None
    try:
        assert torch.equal(_incremental(llama, tokens), reference)
    finally:
        llama._decode_layers = fused


def test_a_decoding_steps_layers_time_their_parts_when_asked(tiny, monkeypatch):
    """``decode_layers(..., seconds=)``, ``bench.py throughput``'s profile of a step: time added to each of
    its parts (products, attention, norms) and no number changed."""
    model, llama = tiny
    if llama._decode_layers is None:
        pytest.skip("the step's layers run kernel by kernel for this model here")
    tokens = _tokens(3, 3, 40, model.config.vocab_size)
    spent = torch.zeros(3, dtype=torch.float64)
    kernels = type(llama.kernels)
    unprofiled = kernels.decode_layers
    monkeypatch.setattr(kernels, "decode_layers", lambda self, *a, **k: unprofiled(self, *a, **k, seconds=spent))
    assert torch.equal(_incremental(llama, tokens), _full(llama, tokens))
    assert (spent > 0).all()


def test_incremental_equals_full_sequence_past_several_query_blocks(tiny):
    model, llama = tiny
    tokens = _tokens(0, 2, 300, model.config.vocab_size)
    assert torch.equal(_incremental(llama, tokens), _full(llama, tokens))


def test_close_to_float32(tiny):
    model, llama = tiny
    ids = model.tokenizer.encode((DATA / "alice_chapter1.txt").read_bytes()[:1500])  # < GPT-2's 1024 positions
    tokens = torch.tensor([[model.tokenizer.prime_token] + ids[:-1]])
    targets = torch.tensor(ids)
    exact = _full(llama, tokens)[0]
    with torch.inference_mode():
        flt = Transformer(model.config, model.weights, torch.float32)
        reference = flt.forward(tokens, flt.new_cache(1, tokens.shape[1]))[0]

    def bits(logits):
        return -torch.log_softmax(logits.double(), -1)[torch.arange(len(ids)), targets].sum().item() / np.log(2)

    assert abs(bits(exact) / bits(reference) - 1) < 0.01  # measured +0.36% on the default model, < 0.1% here


def _integer_seeded_model(arch: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A small model whose float weights come from integers (PCG64), so every machine builds the same one."""
    shared = dict(arch=arch, vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, norm_eps=1e-5)
    shared |= dict(max_position_embeddings=256, rope_theta=10000.0, num_attention_heads=6, head_dim=8)
    if arch == "llama":
        shape = dict(num_key_value_heads=2, norm="rms", positions="rope", rotary_dim=8, activation="silu")
        shape |= dict(gated_mlp=True, parallel_residual=False, tie_word_embeddings=True)
    elif arch == "gpt_neox":
        shape = dict(num_key_value_heads=6, norm="layer", positions="rope", rotary_dim=2, activation="gelu")
        shape |= dict(gated_mlp=False, parallel_residual=True, tie_word_embeddings=False)
    else:
        shape = dict(num_key_value_heads=6, norm="layer", positions="learned", rotary_dim=0, activation="gelu_tanh")
        shape |= dict(gated_mlp=False, parallel_residual=False, tie_word_embeddings=True)
    config = ModelConfig(**shared, **shape)
    generator = np.random.Generator(np.random.PCG64(2026))
    c, inner, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * config.head_dim
    biased = config.norm == "layer"

    def ints(*shape: int) -> torch.Tensor:
        return torch.from_numpy((generator.integers(-1024, 1025, size=shape) / 8192).astype(np.float32))

    weights = {"model.embed_tokens.weight": ints(config.vocab_size, c) * 8, "model.norm.weight": 1 + ints(c)}
    if config.positions == "learned":
        weights["model.embed_positions.weight"] = ints(config.max_position_embeddings, c)
    if not config.tie_word_embeddings:
        weights["lm_head.weight"] = ints(config.vocab_size, c)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            weights[p + norm + ".weight"] = 1 + ints(c)
        if biased:
            weights |= {p + "input_layernorm.bias": ints(c), p + "post_attention_layernorm.bias": ints(c)}
        linear = {"self_attn.q_proj": (c, c), "self_attn.k_proj": (kv, c), "self_attn.v_proj": (kv, c)}
        linear |= {"self_attn.o_proj": (c, c)}
        linear |= {"mlp.gate_proj": (inner, c)} if config.gated_mlp else {}
        linear |= {"mlp.up_proj": (inner, c), "mlp.down_proj": (c, inner)}
        for name, shape in linear.items():
            weights[p + name + ".weight"] = ints(*shape)
            if biased:
                weights[p + name + ".bias"] = ints(shape[0])
    if biased:
        weights["model.norm.bias"] = ints(c)
    return config, weights


PINNED_TABLES_SHA256 = {
    "llama": "bc19b5e6ea92035a147c6f7a1dd6ebafcaa62d80459a0b64c7369c52fcbb7f98",
    "gpt_neox": "0a76425ac1980a4fa9cab8059e6fcf3b114ea78874b9729188b3cf6e6dc9b19a",
    "gpt2": "378164ce9e411b2b1c9327ad63c6f3547623ea1dba8845dccf37991f5a97232e",
}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_frequency_tables_are_pinned(arch):
    """Exact numerics v1 on a model every machine builds identically: any change here breaks old archives.

    Regenerate (only together with a new numerics version) with GENERATE_EXPECTED=1.
    """
    config, weights = _integer_seeded_model(arch)
    llama = ExactTransformer(config, prepare_exact_weights(config, weights))
    tokens = torch.from_numpy(np.random.Generator(np.random.PCG64(7)).integers(0, 97, size=(2, 200)))
    freq = frequency_tables(_full(llama, tokens).reshape(400, -1), 256).to(torch.int64).numpy()
    digest = hashlib.sha256(freq.astype("<i8").tobytes()).hexdigest()
    if os.environ.get("GENERATE_EXPECTED"):
        print(f"\nPINNED_TABLES_SHA256[{arch!r}] = {digest!r}")
        return
    assert digest == PINNED_TABLES_SHA256[arch]


def test_prepared_weights_are_cached_and_a_damaged_copy_is_replaced(tiny_model):
    from llmpipe.engine.exact_engine import _exact_weights

    first = {name: tensor.clone() for name, tensor in _exact_weights(tiny_model).items()}  # not the file's map
    stored = next(tiny_model.directory.glob("exact-v*.safetensors"))
    data = bytearray(stored.read_bytes())
    data[-5] ^= 0x40  # flip a bit inside the last tensor
    stored.write_bytes(bytes(data))
    again = _exact_weights(tiny_model)
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert _exact_weights(tiny_model).keys() == first.keys()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), columns=st.integers(1, 3000), spread=st.integers(0, 60))
def test_fixed_point_dot_ignores_order_and_is_accurate(seed, columns, spread):
    """The folded LayerNorm bias: the same bits in any summation order, within 2^-30 of the float64 dot."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(5, columns, generator=generator) * torch.exp2(torch.randint(-spread, 1, (5, columns)).float())
    vector = torch.randn(columns, generator=generator)
    result = fixed_point_dot(weight, vector)
    order = torch.randperm(columns, generator=generator)
    assert torch.equal(fixed_point_dot(weight[:, order], vector[order]), result)
    exact = (weight.double() * vector.double()).sum(dim=1)
    largest = (weight.double() * vector.double()).abs().amax(dim=1)
    assert ((result.double() - exact).abs() <= largest * columns * 2.0**-39 + exact.abs() * 2.0**-23).all()
