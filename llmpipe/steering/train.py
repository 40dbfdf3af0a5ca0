"""Learning a steering prompt: a few virtual tokens trained on a sample of the input.

Adam on the float32 model, gradients for the prompt only. The decoder only
ever sees the quantised prompt (``step * q``, integers ``q`` coded with the
Gaussian prior of ``hyperprior``), so training quantises in the forward pass
and passes gradients straight through (the straight-through estimator), as
learned-compression models train for their quantised latents; the loss is
the sample's code length in bits. Whether the vector then pays for its own
coded size is measured by the caller.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmpipe.models.cache import LoadedModel
from llmpipe.models.transformer import Transformer
from llmpipe.steering.hyperprior import SCALE_UNITS, limit_of, scale_for
from llmpipe.steering.prompt import embedding_rms


@dataclass
class LearnedVector:
    """Integers ``q`` (P x C, row-major) of a prompt ``step * q``, and what training measured (bits)."""

    q: list[int]
    tokens: int
    step: float
    sample_bits_before: float  # the training rows' code length with no prompt
    sample_bits_after: float  # ... with the quantised learned prompt
    epochs: int
    held_out_bits_before: float | None = None  # the held-out rows', when given
    held_out_bits_after: float | None = None


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
    model: LoadedModel,
    rows: list[list[int]],
    tokens: int,
    *,
    held_out: list[list[int]] | None = None,
    epochs: int = 100,
    seconds: float = 600.0,
    learning_rate: float | None = None,
    log: Callable[[str], None] | None = None,
) -> LearnedVector:
    """Train ``tokens`` virtual tokens on ``rows`` (model inputs, each starting with the prime token), and
    measure the quantised result on ``held_out`` rows too when given."""
    torch.manual_seed(0)
    network = Transformer(model.config, model.weights, torch.float32)
    embed = network.embed
    rms = embedding_rms(embed)
    step = 2.0 ** round(math.log2(rms / 8))  # a power of two: step * q is exact in float32
    sample_bits = SampleBits(network, rows)
    init = embed[sample_bits.inputs[:, 1 : 1 + tokens].reshape(-1)[:tokens]]  # the sample's first tokens
    prompt = init.clone().detach().requires_grad_(True)  # (P, C)
    optimizer = torch.optim.Adam([prompt], lr=learning_rate or rms / 10)
    limit = limit_of(64 * SCALE_UNITS) * step

    def quantised(p: torch.Tensor) -> torch.Tensor:
        """``step * round(p / step)`` forward, identity backward (straight through)."""
        hard = torch.round(p.clamp(-limit, limit) / step) * step
        return p + (hard - p).detach()

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
        q = torch.round(prompt.clamp(-limit, limit) / step).to(torch.int64)
        bound = limit_of(scale_for(q.reshape(-1).tolist()))
        q = q.clamp(-bound, bound)  # within the prior's range
        final = q.to(torch.float32) * step
        vector = LearnedVector(q.reshape(-1).tolist(), tokens, step, before, float(sample_bits(final)), done)
        if held_out:
            held = SampleBits(network, held_out)
            vector.held_out_bits_before, vector.held_out_bits_after = float(held(None)), float(held(final))
    return vector
