"""The float network's matmuls: dense weights in one dtype, or 8-bit weights through bitsandbytes.

``--load-in-8bit`` is LLM.int8 (Dettmers et al. 2022) as ``transformers``'
``BitsAndBytesConfig(load_in_8bit=True)`` applies it: every linear layer of
the blocks holds int8 weights with one absmax scale per output row, and
activation columns above :data:`INT8_THRESHOLD` are multiplied in the compute
dtype instead (the outlier decomposition); the embeddings and the output head
stay in the compute dtype, as transformers leaves ``lm_head`` alone. It halves
the weights of a float16 model (a quarter of float32), which is what lets a
7B model fit a 16 GB GPU. Its numbers are bitsandbytes' own, so the archive
records its version (``engine.float_engine.numeric_fingerprint``).
"""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version

import torch
import torch.nn.functional as F

from llmpipe.errors import UsageError

INT8_THRESHOLD = 6.0
"""Activation magnitude above which a column is multiplied in the compute dtype: transformers' default."""


class DenseLinear:
    """``x W^T + b`` with ``W`` held in the compute dtype on the compute device."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight, self.bias = weight, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Int8Linear:
    """``x W^T + b`` with ``W`` quantised to int8 by bitsandbytes when it reaches ``device``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, device: torch.device) -> None:
        bnb = import_bitsandbytes()
        out_features, in_features = weight.shape
        layer = bnb.nn.Linear8bitLt(
            in_features,
            out_features,
            bias=bias is not None,
            has_fp16_weights=False,
            threshold=INT8_THRESHOLD,
            device="meta",  # no throw-away float weight: the real one is assigned next
        )
        layer.weight = bnb.nn.Int8Params(weight.detach(), requires_grad=False, has_fp16_weights=False)
        if bias is not None:
            layer.bias = torch.nn.Parameter(bias.detach(), requires_grad=False)
        self._layer = layer.to(device)  # quantises the weight (row-wise absmax) where it will run
        self.weight = self._layer.weight  # int8, for memory accounting

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._layer(x)


def import_bitsandbytes():
    """bitsandbytes, imported quietly (its CPU backend logs a warning about optional 4-bit kernels)."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError as exc:  # pragma: no cover - it is a dependency; a broken install lands here
        raise UsageError(f"--load-in-8bit needs bitsandbytes, which does not import here: {exc}") from None
    return bitsandbytes


def bitsandbytes_version() -> str:
    try:
        return version("bitsandbytes")
    except PackageNotFoundError:  # pragma: no cover - a dependency
        return "absent"
