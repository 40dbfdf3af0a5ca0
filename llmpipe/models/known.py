"""Configurations of the models the source study used, for planning offline (no download, no weights).

Copied from each model's ``config.json`` on the Hugging Face hub (only the
fields :class:`~llmpipe.models.config.ModelConfig` reads), so
``ModelConfig.from_hf`` gives the architecture of a model this machine has
never fetched: for memory plans and for tests at full size on a meta device.
"""

from __future__ import annotations

from llmpipe.models.config import ModelConfig

_PYTHIA = {"model_type": "gpt_neox", "hidden_act": "gelu", "layer_norm_eps": 1e-5, "max_position_embeddings": 2048}
_PYTHIA |= {"rotary_emb_base": 10000, "rotary_pct": 0.25, "use_parallel_residual": True, "vocab_size": 50304}
_PYTHIA |= {"tie_word_embeddings": False}
_OPEN_LLAMA = {"model_type": "llama", "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6}
_OPEN_LLAMA |= {"vocab_size": 32000, "tie_word_embeddings": False}

KNOWN_CONFIGS: dict[str, dict] = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": {
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
    },
    "EleutherAI/pythia-70m": _PYTHIA
    | {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 6, "num_attention_heads": 8},
    "EleutherAI/pythia-160m": _PYTHIA
    | {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
    "gpt2": {
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "n_embd": 768,
        "n_head": 12,
        "n_layer": 12,
        "n_positions": 1024,
        "layer_norm_epsilon": 1e-5,
        "vocab_size": 50257,
    },
    "openlm-research/open_llama_3b": _OPEN_LLAMA
    | {"hidden_size": 3200, "intermediate_size": 8640, "num_hidden_layers": 26, "num_attention_heads": 32},
    "openlm-research/open_llama_7b": _OPEN_LLAMA
    | {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32},
}


def known_config(name: str) -> ModelConfig | None:
    """The architecture of a model in :data:`KNOWN_CONFIGS`, or None."""
    hf = KNOWN_CONFIGS.get(name)
    return None if hf is None else ModelConfig.from_hf(hf)
