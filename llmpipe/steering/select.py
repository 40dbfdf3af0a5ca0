"""Choosing how (and whether) to steer by total size: the vector's header bytes plus the text's bits.

Every candidate coding of a learned prompt (``quantise.candidates``) gives a
decoded vector; its text bits are measured on held-out rows of the input
(rows the training never saw) under the float model and projected to the
whole window by bytes. The candidate's cost is what it adds to the archive
header, measured on the real header. The total of each, and of no prompt at
all, is ranked; ``learn:N`` takes the best learned coding, ``auto`` the best
of all only when its projected saving clears :data:`AUTO_MARGIN` times its
cost (held-out rows overstate a prompt's effect, from 2x to over 10x: see STEERING.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmpipe.models.transformer import Transformer
from llmpipe.steering.quantise import CodedVector
from llmpipe.steering.train import SampleBits

AUTO_MARGIN = 5.0
"""``auto`` keeps a vector only when its projected saving is at least this many times its cost. Measured
against the projection (STEERING.md): 0.52 on 1 MB of enwik8, about 0.5 on world192.txt, 0.31 on
calgary/news, and about 0.07 on text8, whose projected saving was 2.65 times its vector (kept under the
earlier margin of 2.5, it made the archive larger). A projected saving of 5 times leaves room for the
ordinary shortfall; world192.txt (7.1 times, measured slices repaying it) is the corpus file that clears it."""


@dataclass(frozen=True)
class Estimate:
    """One option's projected size: ``coded`` None is no prompt."""

    coded: CodedVector | None
    vector_bits: int  # what the option adds to the archive header
    held_out_bits: float  # the held-out rows' code length under the float model
    projected_text_bits: float  # held_out_bits scaled to the window's bytes

    @property
    def total(self) -> float:
        return self.vector_bits + self.projected_text_bits

    @property
    def label(self) -> str:
        return self.coded.label if self.coded else "none"


def held_out_bits(network: Transformer, held_out: list[list[int]], prompt: torch.Tensor | None) -> float:
    """The code length of ``held_out`` rows with ``prompt`` (embedding rows) in front, one row at a time
    (long rows' logits are big)."""
    with torch.no_grad():
        return sum(float(SampleBits(network, [row])(prompt)) for row in held_out)


def rank(
    network: Transformer,
    held_out: list[list[int]],
    options: list[CodedVector],
    header_bits: Callable[[CodedVector | None], int],
    projection: float,
    plain_bits: float | None = None,
) -> list[Estimate]:
    """No prompt and every option, smallest projected total first. ``header_bits`` is the header's growth
    with an option; ``projection`` the window's bytes over the held-out rows' bytes; ``plain_bits`` the
    held-out bits with no prompt, when already measured."""
    measured: dict[bytes, float] = {} if plain_bits is None else {b"": plain_bits}  # options sharing a vector

    def bits_of(coded: CodedVector | None) -> float:
        key = b"" if coded is None else coded.values.tobytes()
        if key not in measured:
            measured[key] = held_out_bits(network, held_out, None if coded is None else torch.from_numpy(coded.values))
        return measured[key]

    estimates = [
        Estimate(coded, header_bits(coded), bits_of(coded), bits_of(coded) * projection) for coded in [None, *options]
    ]
    return sorted(estimates, key=lambda e: e.total)


def best_learned(estimates: list[Estimate]) -> Estimate:
    """The learned option with the smallest projected total."""
    return min((e for e in estimates if e.coded is not None), key=lambda e: e.total)


def clears_margin(saving: float, vector_bits: int) -> bool:
    """``auto``'s rule: is a projected text saving worth a vector of ``vector_bits``?"""
    return saving >= AUTO_MARGIN * vector_bits


def choose(estimates: list[Estimate], auto: bool) -> Estimate:
    """``learn:N``: the best learned option. ``auto``: that option when it saves :data:`AUTO_MARGIN` times
    its cost against no prompt, else no prompt."""
    none = next(e for e in estimates if e.coded is None)
    best = best_learned(estimates)
    if auto and not clears_margin(none.projected_text_bits - best.projected_text_bits, best.vector_bits):
        return none
    return best
