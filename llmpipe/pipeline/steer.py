"""The ``--steer`` modes at work: a fixed prompt, or one learned on a stream's first window.

``learn:N`` and ``auto`` train a prompt of N virtual tokens on rows spread
across the first window (``steering.train``), code it every way
``steering.quantise`` offers, measure each coding on rows the training did
not see (``steering.select``), and keep the one with the smallest projected
total, header bits included; ``auto`` may keep none, and decides on the
input's size first (:data:`AUTO_MIN_BYTES`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import zstandard

from llmpipe.models.cache import LoadedModel
from llmpipe.models.transformer import Transformer
from llmpipe.pipeline.blocks import ZSTD_LEVEL, utf8_safe_split
from llmpipe.steering.prompt import SteeringPrompt, embedding_rms, learn_tokens, learned_prompt, parse_steer
from llmpipe.steering.quantise import candidates
from llmpipe.steering.select import Estimate, choose, held_out_bits, rank
from llmpipe.steering.train import LearnedVector, learn_vector

TRAIN_ROWS, TRAIN_TOKENS = 8, 256
"""A learned prompt trains on this many rows of this many tokens, spread across the first window."""
HELD_OUT_ROWS, HELD_OUT_TOKENS = 4, 1024
"""... and its codings are measured on rows the training did not see, as long as the default context."""
AUTO_TOKENS = 1
"""``--steer auto`` tries one virtual token: the cheapest vector (C values)."""
AUTO_MIN_BYTES = 32 * 1024 * 1024
"""``auto`` trains only on inputs of at least this many bytes (the writer reads that far ahead before the
stream header), where its work is a few percent of the coding's. On a 2 MiB first window the work is fixed:
20 training steps of about 15 s and 8 held-out evaluations of 33-64 s on this project's 2-core machine,
about 10-14 minutes, while coding runs at about 1.3 KB/s there (BENCHMARKS.md, throughput): 32 MiB take
about 7 hours, so the decision costs about 3% of them, and nothing at all on smaller inputs. Below it a
vector rarely repays even its bits: one token costs about 2,000 header bits and saved 2-3 bits per KB of
enwik8 and calgary/news, about 10 on world192.txt (STEERING.md)."""


def sample_rows(window: bytes, tokenizer, count: int, tokens: int, skip: int = 0) -> list[list[int]]:
    """Up to ``count`` rows of at most ``tokens`` model inputs (each after the prime token), starting at
    ``skip`` and even intervals across ``window``."""
    rows = []
    stride = max(1, len(window) // count)
    for a in range(skip, len(window), stride):
        piece = window[a : a + 4 * tokens]
        piece = piece[: utf8_safe_split(piece)] if a + len(piece) < len(window) else piece
        symbols = tokenizer.encode(piece)[:tokens]
        if len(symbols) > 1:
            rows.append([tokenizer.prime_token] + [tokenizer.model_input(x) for x in symbols])
    return rows[:count]


@dataclass(frozen=True)
class SteeringChoice:
    """What ``learn:N``/``auto`` learned on a first window, every option's projected size, and the pick."""

    vector: LearnedVector
    estimates: list[Estimate]
    chosen: Estimate


def held_out_rows(window: bytes, tokenizer) -> list[list[int]]:
    """The rows a learned prompt's codings are measured on: between the training rows, which start at
    multiples of ``len(window) / TRAIN_ROWS``."""
    return sample_rows(window, tokenizer, HELD_OUT_ROWS, HELD_OUT_TOKENS, len(window) // (2 * TRAIN_ROWS))


class Steering:
    """A compressor's ``--steer`` mode: the fixed prompt, or how to learn one for each stream."""

    def __init__(
        self,
        spec: str,
        model: LoadedModel,
        epochs: int,
        seconds: float,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.auto = spec == "auto"
        self.learn = AUTO_TOKENS if self.auto else learn_tokens(spec)
        """Virtual tokens to learn on each stream (None: a fixed prompt)."""
        self.fixed = None if self.learn else parse_steer(spec, model)
        """The fixed mode's prompt (``none``: None)."""
        self._model = model
        self._budget = (epochs, seconds)
        self._log = log
        self._zstd = zstandard.ZstdCompressor(level=ZSTD_LEVEL)

    @property
    def lookahead(self) -> int:
        """How many bytes of a stream's input to read before its header: ``auto`` decides on the input's
        size (:data:`AUTO_MIN_BYTES`), the other modes on the first window alone."""
        return AUTO_MIN_BYTES if self.auto else 0

    @property
    def prompt_positions(self) -> int:
        """The most positions a prompt of this mode takes in every row (for the memory plan)."""
        return self.learn or (self.fixed.length if self.fixed else 0)

    def decide(
        self,
        sample: bytes,
        seen: int | None,
        header_bits: Callable[[SteeringPrompt | None], int],
    ) -> SteeringChoice | None:
        """Learn a prompt on ``sample`` (``learn:N`` and ``auto``), code it every way ``steering.quantise``
        offers, and pick the coding with the smallest projected total (``auto``: or none,
        ``steering.select.choose``). ``seen``: how many bytes of the input were read ahead (at least
        ``sample``); ``header_bits``: what a prompt adds to the stream header. Returns what was learned and
        measured, if anything (then ``chosen.coded`` is the prompt to code with, or None for none)."""
        if not self.learn or not sample:
            return None
        log = self._log or (lambda line: None)
        if self.auto and max(len(sample), seen or 0) < AUTO_MIN_BYTES:
            log(f"steering: auto: none (input under {AUTO_MIN_BYTES} bytes: training would not repay its time)")
            return None
        started = time.perf_counter()
        model, tokenizer = self._model, self._model.tokenizer
        train, held_out = sample_rows(sample, tokenizer, TRAIN_ROWS, TRAIN_TOKENS), held_out_rows(sample, tokenizer)
        if not train or not held_out:  # too little text to learn from: no prompt
            return None
        network = Transformer(model.config, model.weights, torch.float32)
        held_bytes = sum(len(tokenizer.spellings[x]) for row in held_out for x in row[1:])
        projection = len(sample) / max(1, held_bytes)
        plain_bits = held_out_bits(network, held_out, None)
        if self.auto and plain_bits * projection >= (zstd := 8 * len(self._zstd.compress(sample))):
            log(f"steering: auto: none (the model codes this window no better than zstd's {zstd} bits)")
            return None  # its rows would go to zstd blocks
        epochs, seconds = self._budget
        vector = learn_vector(network, train, self.learn, epochs=epochs, seconds=seconds, log=self._log)
        log(
            f"steering: learned {self.learn} tokens in {vector.epochs} epochs: training rows "
            f"{vector.sample_bits_before:.0f} -> {vector.sample_bits_after:.0f} bits"
        )
        estimates = rank(
            network,
            held_out,
            candidates(vector.values, embedding_rms(network.embed)),
            lambda coded: header_bits(learned_prompt(coded) if coded else None),
            projection,
            plain_bits,
        )
        for e in estimates:
            log(
                f"steering: {e.label}: vector {e.vector_bits} bits, held-out {e.held_out_bits:.0f} bits, "
                f"projected total {e.total:.0f} bits"
            )
        chosen = choose(estimates, self.auto)
        none = next(e for e in estimates if e.coded is None)
        log(f"steering: {'auto: ' if self.auto else ''}chose {chosen.label}")
        log(
            f"steering: the decision took {time.perf_counter() - started:.0f} s for a projected saving of "
            f"{(none.total - chosen.total) / 8:,.0f} bytes on this window"
        )
        return SteeringChoice(vector, estimates, chosen)
