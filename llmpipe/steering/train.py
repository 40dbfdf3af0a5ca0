"""Learning a steering prompt: a few virtual tokens trained on a sample of the input.

Adam on the float32 model, gradients for the prompt only. The decoder only
ever sees a quantised prompt, so training quantises in the forward pass (on
the finest grid ``quantise`` offers, ``step = rms / 8`` rounded to a power
of two) and passes gradients straight through (the straight-through
estimator), as learned-compression models train for their quantised latents;
the loss is the sample's code length in bits. Which quantiser and prior then
code the vector, and whether it pays for itself at all, is chosen by total
size in ``select``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from llmpipe.models.transformer import Transformer
from llmpipe.steering.prompt import embedding_rms
from llmpipe.steering.quantise import finest_step


@dataclass
class LearnedVector:
    """A trained prompt (P x C float32, on the grid of ``step``) and what training measured (bits)."""

    values: np.ndarray
    step: float
    sample_bits_before: float  # the training rows' code length with no prompt
    sample_bits_after: float  # ... with the learned prompt
    epochs: int


class SampleBits:
    """The code length in bits of rows of model inputs (each after the prime token) under the float model,
    with a prompt of embedding rows in front, or none; differentiable in the prompt."""

    def __init__(self, network: Transformer, rows: list[list[int]]) -> None:
        self.network = network
        self.width = max(len(r) for r in rows)
        self.inputs = torch.tensor([r + [r[-1]] * (self.width - len(r)) for r in rows])  # (B, T)
        # (B, T - 1): which predicted targets are real (rows shorter than the widest are padded)
        self.mask = torch.tensor([[1.0] * (len(r) - 1) + [0.0] * (self.width - len(r)) for r in rows])

    def __call__(self, prompt: torch.Tensor | None) -> torch.Tensor:
        x = self.network.embed[self.inputs]  # (B, T, C)
        if prompt is not None:
            x = torch.cat([prompt[None].expand(len(x), -1, -1), x], dim=1)
        logits = self.network.logits_of_embeddings(x)[:, -self.width : -1]  # predictions of inputs 1..T-1
        targets = self.inputs[:, 1:].reshape(-1)
        nats = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, reduction="none")
        return (nats * self.mask.reshape(-1)).sum() / math.log(2)


def learn_vector(
    network: Transformer,
    rows: list[list[int]],
    tokens: int,
    *,
    epochs: int = 100,
    seconds: float = 600.0,
    learning_rate: float | None = None,
    log: Callable[[str], None] | None = None,
) -> LearnedVector:
    """Train ``tokens`` virtual tokens of the float32 ``network`` on ``rows`` (model inputs, each starting
    with the prime token), starting from the embeddings of the sample's first tokens."""
    torch.manual_seed(0)
    embed = network.embed
    rms = embedding_rms(embed)
    step = finest_step(rms)
    sample_bits = SampleBits(network, rows)
    init = embed[sample_bits.inputs[:, 1 : 1 + tokens].reshape(-1)[:tokens]]  # the sample's first tokens
    prompt = init.clone().detach().requires_grad_(True)  # (P, C)
    optimizer = torch.optim.Adam([prompt], lr=learning_rate or rms / 10)

    def quantised(p: torch.Tensor) -> torch.Tensor:
        """``step * round(p / step)`` forward, identity backward (straight through)."""
        return p + (torch.round(p / step) * step - p).detach()

    with torch.no_grad():
        before = float(sample_bits(None))
    started = time.perf_counter()
    done = 0
    for done in range(1, epochs + 1):
        optimizer.zero_grad()
        loss = sample_bits(quantised(prompt))
        loss.backward()
        optimizer.step()
        if log and (done % 10 == 0 or done == epochs):
            log(f"steering: epoch {done}/{epochs}, sample {float(loss.detach()):.0f} bits (no prompt: {before:.0f})")
        if time.perf_counter() - started > seconds:
            break
    with torch.no_grad():
        final = quantised(prompt)
        return LearnedVector(final.numpy().astype(np.float32), step, before, float(sample_bits(final)), done)
