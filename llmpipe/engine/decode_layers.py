"""A decoding step's layers in one call of the compiled ``layers.c``, for Llama-shaped models.

A step of one or a few rows (a small input decodes one row per step) spent
about a third of its time between the kernels: some 13 calls a layer through
ctypes, the tensors they return, the Python around them. ``layers.c`` runs
the same kernels in the same order (``ExactTransformer._hidden``), so the
bits are the same; models of other shapes (LayerNorm, learned positions,
parallel residuals, biases), and machines without the kernels, keep the
step as it was.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llmpipe.engine.exact_weights import ExactWeight
from llmpipe.engine.integer_ops import ACT_MAX, fused_products_win
from llmpipe.engine.kernels import NetworkKernels
from llmpipe.models.config import ModelConfig
from llmpipe.numerics import tables

MATRICES = ("qkv", "o", "gate_up", "down")
SMALL_STEP_ROWS = 8
"""Steps of at most this many rows always take this path; larger ones where the fused int16 products are
the faster ones here (``integer_ops.fused_products_win``), which the layers here always use."""


class DecodeLayers:
    """One model's layers for ``layers.c``: the address of every weight matrix and its scales, and the
    tables a step reads (RoPE, the attention's exp, the activation)."""

    def __init__(
        self,
        config: ModelConfig,
        layers: Sequence[dict[str, ExactWeight]],
        kernels: NetworkKernels,
        rope: tuple[torch.Tensor, torch.Tensor],
        score_factor: float,
        attention_exp: torch.Tensor,
        activation: tuple[torch.Tensor, int],
        kv_max: int,
    ) -> None:
        self._config = config
        self._kernels = kernels
        self._rope = rope
        self._score_factor = score_factor
        self._exp = attention_exp.contiguous()
        self._activation = (activation[0].contiguous(), activation[1], float(tables.ACTIVATION_GRID))
        self._limits = (ACT_MAX, kv_max)
        matrices = [(layer[m].pairs, layer[m].scale) for layer in layers for m in MATRICES]
        self._addresses = torch.tensor([t.data_ptr() for matrix in matrices for t in matrix], dtype=torch.int64)

    @staticmethod
    def fits(config: ModelConfig, layers: Sequence[dict[str, ExactWeight]]) -> bool:
        """Is the model Llama-shaped, with every matrix paired for the kernels, contiguous and without a bias?"""
        llama = config.norm == "rms" and config.positions == "rope" and config.gated_mlp
        if not llama or config.parallel_residual:
            return False
        weights = [layer[m] for layer in layers for m in MATRICES]
        paired = all(w.pairs is not None and w.pairs.is_contiguous() for w in weights)
        return paired and all(w.bias is None and w.scale.is_contiguous() for w in weights)

    def wanted(self, rows: int) -> bool:
        return rows <= SMALL_STEP_ROWS or fused_products_win(self._kernels)

    def run(self, x: torch.Tensor, planes: tuple[torch.Tensor, ...], start: int) -> bool:
        """Run every layer on ``x`` (B, C) float32, contiguous, in place, for position ``start`` of each of
        the B rows, whose keys and values go into ``planes`` (the cache's keys, values and their scales, all
        layers). False when the kernels had no scratch memory."""
        cfg = self._config
        cos, sin = (t[start : start + 1].contiguous() for t in self._rope)
        shape = (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
        return self._kernels.decode_layers(
            x,
            self._addresses,
            shape,
            cfg.intermediate_size,
            (cos, sin),
            self._score_factor,
            self._limits,
            planes,
            start,
            self._exp,
            self._activation,
            cfg.norm_eps,
        )
