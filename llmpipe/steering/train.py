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


class PromptTrainer:
    """Adam on ``tokens`` virtual tokens of the float32 ``network`` over ``rows`` (model inputs, each
    starting with the prime token), starting from the embeddings of the sample's first tokens; trained in
    as many calls of :meth:`train` as wanted (``auto`` probes with a few steps before it trains on)."""

    def __init__(
        self, network: Transformer, rows: list[list[int]], tokens: int, learning_rate: float | None = None
    ) -> None:
        torch.manual_seed(0)
        embed = network.embed
        rms = embedding_rms(embed)
        self.step = finest_step(rms)
        self.sample_bits = SampleBits(network, rows)
        init = embed[self.sample_bits.inputs[:, 1 : 1 + tokens].reshape(-1)[:tokens]]  # the sample's first tokens
        self.prompt = init.clone().detach().requires_grad_(True)  # (P, C)
        self.optimizer = torch.optim.Adam([self.prompt], lr=learning_rate or rms / 10)
        self.epochs = 0
        self.losses: list[float] = []  # the training rows' bits at each step, before its update
        with torch.no_grad():
            self.bits_before = float(self.sample_bits(None))

    def quantised(self) -> torch.Tensor:
        """The prompt on its grid, ``step * round(p / step)``: forward that, identity backward (straight
        through)."""
        p = self.prompt
        return p + (torch.round(p / self.step) * self.step - p).detach()

    def train(
        self, epochs: int, seconds: float = float("inf"), log: Callable[[str], None] | None = None, of: int = 0
    ) -> None:
        """Up to ``epochs`` more steps within ``seconds`` (``of``: the total planned, for the log)."""
        started = time.perf_counter()
        for _ in range(epochs):
            self.optimizer.zero_grad()
            loss = self.sample_bits(self.quantised())
            loss.backward()
            self.optimizer.step()
            self.epochs += 1
            self.losses.append(float(loss.detach()))
            if log and (self.epochs % 10 == 0 or self.epochs == (of or epochs)):
                total = of or epochs
                log(
                    f"steering: epoch {self.epochs}/{total}, sample {float(loss.detach()):.0f} bits "
                    f"(no prompt: {self.bits_before:.0f})"
                )
            if time.perf_counter() - started > seconds:
                break

    def vector(self) -> LearnedVector:
        """The prompt as trained so far."""
        with torch.no_grad():
            final = self.quantised()
            after = float(self.sample_bits(final))
            return LearnedVector(final.numpy().astype(np.float32), self.step, self.bits_before, after, self.epochs)


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
    """Train ``tokens`` virtual tokens (:class:`PromptTrainer`) for ``epochs`` steps within ``seconds``."""
    trainer = PromptTrainer(network, rows, tokens, learning_rate)
    trainer.train(epochs, seconds, log)
    return trainer.vector()
