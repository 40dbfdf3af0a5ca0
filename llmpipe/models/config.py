"""One description for the decoder-only transformers llmpipe runs: Llama, GPT-NeoX and GPT-2.

The three families differ in a handful of choices (which normalisation, how
positions enter, which MLP, whether attention and MLP run in parallel), so
one forward pass per engine covers them all, driven by :class:`ModelConfig`.
The model cache converts every checkpoint's weights to one naming
(``llmpipe.models.convert``), so nothing downstream knows where a model came
from. ``ModelConfig.from_hf`` reads a Hugging Face ``config.json`` and refuses
what the forward passes do not implement, before any weights are loaded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from llmpipe.errors import ModelError

ARCHITECTURES = ("llama", "gpt_neox", "gpt2")
"""Hugging Face ``model_type`` values llmpipe can run."""
ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # one of ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    norm: str  # "rms" (Llama) or "layer" (mean and variance, with a bias)
    norm_eps: float
    positions: str  # "rope" (rotary, on the first rotary_dim dims of each head) or "learned" (GPT-2)
    rope_theta: float
    rotary_dim: int
    activation: str  # one of ACTIVATIONS
    gated_mlp: bool  # down(act(gate(h)) * up(h)) (Llama) or down(act(up(h))) (GPT-NeoX, GPT-2)
    parallel_residual: bool  # x + attn(norm1(x)) + mlp(norm2(x)) (GPT-NeoX)
    max_position_embeddings: int
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, hf: dict) -> ModelConfig:
        """Read a Hugging Face ``config.json`` dictionary (transformers 4 or 5 spelling)."""
        arch = hf.get("model_type")
        if arch == "llama":
            return _llama(hf)
        if arch == "gpt_neox":
            return _gpt_neox(hf)
        if arch == "gpt2":
            return _gpt2(hf)
        raise ModelError(f"architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")

    @classmethod
    def from_dict(cls, stored: dict) -> ModelConfig:
        """Read a cached ``config.json``; caches written before GPT-NeoX/GPT-2 support held Llama fields only."""
        if "arch" not in stored:
            stored = _legacy_llama(stored)
        return cls(**{f.name: stored[f.name] for f in fields(cls)})

    def to_dict(self) -> dict:
        return asdict(self)


def _rope_parameters(hf: dict) -> tuple[float, float]:
    """(theta, partial rotary factor) from either transformers 5's ``rope_parameters`` or the older keys."""
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
        raise ModelError("scaled rotary embeddings (rope_scaling) are not supported")
    theta = rope.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    factor = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rotary_pct", 1.0)))
    return float(theta), float(factor)


def _activation(name: str) -> str:
    spelling = {
        "silu": "silu",
        "swish": "silu",
        "gelu": "gelu",
        "gelu_new": "gelu_tanh",
        "gelu_pytorch_tanh": "gelu_tanh",
    }
    if name not in spelling:
        raise ModelError(f"activation {name!r} is not supported")
    return spelling[name]


def _llama(hf: dict) -> ModelConfig:
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    theta, factor = _rope_parameters(hf)
    return ModelConfig(
        arch="llama",
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        norm="rms",
        norm_eps=float(hf["rms_norm_eps"]),
        positions="rope",
        rope_theta=theta,
        rotary_dim=int(head_dim * factor),
        activation=_activation(hf.get("hidden_act", "silu")),
        gated_mlp=True,
        parallel_residual=False,
        max_position_embeddings=hf["max_position_embeddings"],
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def _gpt_neox(hf: dict) -> ModelConfig:
    heads = hf["num_attention_heads"]
    head_dim = hf["hidden_size"] // heads
    theta, factor = _rope_parameters(hf)
    return ModelConfig(
        arch="gpt_neox",
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=head_dim,
        norm="layer",
        norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
        positions="rope",
        rope_theta=theta,
        rotary_dim=int(head_dim * factor),
        activation=_activation(hf.get("hidden_act", "gelu")),
        gated_mlp=False,
        parallel_residual=bool(hf.get("use_parallel_residual", True)),
        max_position_embeddings=hf["max_position_embeddings"],
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def _gpt2(hf: dict) -> ModelConfig:
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
        raise ModelError("GPT-2 variants with non-standard attention scaling are not supported")
    hidden, heads = hf["n_embd"], hf["n_head"]
    return ModelConfig(
        arch="gpt2",
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        intermediate_size=hf.get("n_inner") or 4 * hidden,
        num_hidden_layers=hf["n_layer"],
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hidden // heads,
        norm="layer",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        positions="learned",
        rope_theta=0.0,
        rotary_dim=0,
        activation=_activation(hf.get("activation_function", "gelu_new")),
        gated_mlp=False,
        parallel_residual=False,
        max_position_embeddings=hf["n_positions"],
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


def _legacy_llama(stored: dict) -> dict:
    """A cached Llama ``config.json`` from before ``arch`` existed, in today's fields."""
    return {
        **stored,
        "arch": "llama",
        "norm": "rms",
        "norm_eps": stored["rms_norm_eps"],
        "positions": "rope",
        "rotary_dim": stored["head_dim"],
        "activation": "silu",
        "gated_mlp": True,
        "parallel_residual": False,
    }
