"""Hugging Face checkpoints -> llmpipe's one weight naming (Llama's, plus biases and position embeddings).

Canonical names, for layer ``i`` (``.bias`` entries only where the checkpoint has them):

    model.embed_tokens.weight            (V, C)
    model.embed_positions.weight         (P, C)   learned positions (GPT-2) only
    model.layers.i.input_layernorm.weight / .bias
    model.layers.i.self_attn.{q,k,v,o}_proj.weight / .bias     (out, in)
    model.layers.i.post_attention_layernorm.weight / .bias
    model.layers.i.mlp.gate_proj.weight  gated MLPs (Llama) only
    model.layers.i.mlp.up_proj.weight / .bias
    model.layers.i.mlp.down_proj.weight / .bias
    model.norm.weight / .bias
    lm_head.weight                       untied models only

Llama checkpoints already use these names. GPT-NeoX interleaves q, k and v per
head in one matrix, and GPT-2 stores its ``Conv1D`` weights transposed; both
are rearranged here, once, when a model enters the cache.
"""

from __future__ import annotations

import torch

from llmpipe.models.config import ModelConfig


def canonical_weights(config: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The canonical weights of a Hugging Face ``state_dict``, in its dtype (float16/bfloat16/float32)."""
    state = {name: tensor.detach() for name, tensor in state.items()}
    if config.arch == "llama":
        out = {name: t for name, t in state.items() if name.startswith("model.") or name == "lm_head.weight"}
        out = {name: t for name, t in out.items() if "rotary_emb" not in name}
    elif config.arch == "gpt_neox":
        out = _from_gpt_neox(config, state)
    else:
        out = _from_gpt2(config, state)
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return {name: t.contiguous() for name, t in out.items()}


def _copy_optional(out: dict, state: dict, target: str, source: str) -> None:
    """``target.weight``/``.bias`` from ``source.weight``/``.bias``, each where present."""
    for part in ("weight", "bias"):
        if f"{source}.{part}" in state:
            out[f"{target}.{part}"] = state[f"{source}.{part}"]


def _from_gpt_neox(config: ModelConfig, state: dict) -> dict:
    heads, hd, c = config.num_attention_heads, config.head_dim, config.hidden_size
    out = {"model.embed_tokens.weight": state["gpt_neox.embed_in.weight"]}
    for i in range(config.num_hidden_layers):
        src, dst = f"gpt_neox.layers.{i}.", f"model.layers.{i}."
        _copy_optional(out, state, dst + "input_layernorm", src + "input_layernorm")
        _copy_optional(out, state, dst + "post_attention_layernorm", src + "post_attention_layernorm")
        # rows are (head, [q | k | v], head_dim): regroup into q, k, v each (head, head_dim)
        qkv = state[src + "attention.query_key_value.weight"].view(heads, 3, hd, c)
        for j, name in enumerate("qkv"):
            out[dst + f"self_attn.{name}_proj.weight"] = qkv[:, j].reshape(heads * hd, c)
        if src + "attention.query_key_value.bias" in state:
            bias = state[src + "attention.query_key_value.bias"].view(heads, 3, hd)
            for j, name in enumerate("qkv"):
                out[dst + f"self_attn.{name}_proj.bias"] = bias[:, j].reshape(heads * hd)
        _copy_optional(out, state, dst + "self_attn.o_proj", src + "attention.dense")
        _copy_optional(out, state, dst + "mlp.up_proj", src + "mlp.dense_h_to_4h")
        _copy_optional(out, state, dst + "mlp.down_proj", src + "mlp.dense_4h_to_h")
    _copy_optional(out, state, "model.norm", "gpt_neox.final_layer_norm")
    head = "lm_head.weight" if "lm_head.weight" in state else "embed_out.weight"  # transformers 5 / 4 naming
    out["lm_head.weight"] = state[head]
    return out


def _from_gpt2(config: ModelConfig, state: dict) -> dict:
    c = config.hidden_size
    state = {name.removeprefix("transformer."): t for name, t in state.items()}
    out = {"model.embed_tokens.weight": state["wte.weight"], "model.embed_positions.weight": state["wpe.weight"]}

    def conv1d(target: str, source: str) -> None:  # Conv1D keeps (in, out)
        out[f"{target}.weight"] = state[f"{source}.weight"].t()
        out[f"{target}.bias"] = state[f"{source}.bias"]

    for i in range(config.num_hidden_layers):
        src, dst = f"h.{i}.", f"model.layers.{i}."
        _copy_optional(out, state, dst + "input_layernorm", src + "ln_1")
        _copy_optional(out, state, dst + "post_attention_layernorm", src + "ln_2")
        weight, bias = state[src + "attn.c_attn.weight"].t(), state[src + "attn.c_attn.bias"]
        for j, name in enumerate("qkv"):
            out[dst + f"self_attn.{name}_proj.weight"] = weight[j * c : (j + 1) * c]
            out[dst + f"self_attn.{name}_proj.bias"] = bias[j * c : (j + 1) * c]
        conv1d(dst + "self_attn.o_proj", src + "attn.c_proj")
        conv1d(dst + "mlp.up_proj", src + "mlp.c_fc")
        conv1d(dst + "mlp.down_proj", src + "mlp.c_proj")
    _copy_optional(out, state, "model.norm", "ln_f")
    if "lm_head.weight" in state:
        out["lm_head.weight"] = state["lm_head.weight"]
    return out
