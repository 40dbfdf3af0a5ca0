"""LLM coding of a group of chunks: the heart of llmpipe.

Each chunk is one sequence of symbols, coded into its own range-coder
stream. A chunk starts from the tokenizer's prime token and never sees
another chunk, so every chunk is independently decodable.

The decoder advances all chunks of a group together, one position per step
through a KV cache (:meth:`LlmCoder.decode_group`). The encoder does the
same with the float engine, whose numbers are only reproducible on the
same schedule; with the exact engine it scores each chunk's positions in
full-sequence passes instead, which gives identical tables much faster.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from llmpipe.coder.frequencies import code_positions, find_symbols
from llmpipe.coder.range_coder import RangeDecoder, RangeEncoder
from llmpipe.tokenization import ByteTokenizer


class Session(Protocol):
    def step(self, inputs: list[int]) -> torch.Tensor: ...


class Engine(Protocol):
    """What the coder needs from an engine (``FloatEngine``, ``ExactEngine``)."""

    full_sequence: bool
    max_positions: int

    def numerics(self) -> dict: ...

    def session(self, rows: int, max_len: int) -> Session: ...

    def tables(self, inputs: list[list[int]]) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Only where ``full_sequence``: the tables of every position, see ``ExactEngine.tables``."""
        ...


@dataclass
class EncodedGroup:
    payloads: list[bytes]
    ideal_bits: list[float]  # each chunk's code length under its own frequency tables, -sum log2(f / total)


class LlmCoder:
    """Encodes and decodes groups of symbol sequences with one engine and tokenizer."""

    def __init__(self, engine: Engine, tokenizer: ByteTokenizer) -> None:
        self.engine = engine
        self.tokenizer = tokenizer

    def encode_group(self, sequences: list[list[int]]) -> EncodedGroup:
        encoders = [RangeEncoder() for _ in sequences]
        ideal = [0.0] * len(sequences)

        def code(row: int, starts: list[int], sizes: list[int], totals: list[int]) -> None:
            encoder = encoders[row]
            for start, size, total in zip(starts, sizes, totals, strict=True):
                encoder.encode(start, size, total)
            ideal[row] += float(np.log2(np.array(totals, dtype=np.float64) / np.array(sizes)).sum())

        if self.engine.full_sequence:
            model_input = self.tokenizer.model_input
            inputs = [[self.tokenizer.prime_token] + [model_input(s) for s in seq[:-1]] for seq in sequences]
            for row, first, freq in self.engine.tables(inputs):
                symbols = torch.tensor(sequences[row][first : first + len(freq)])
                code(row, *code_positions(freq, symbols))
        else:  # replay the decoder's schedule exactly
            counts = [len(s) for s in sequences]
            session = self.engine.session(len(sequences), max(counts))
            inputs = [self.tokenizer.prime_token] * len(sequences)
            for step in range(max(counts)):
                live = [r for r in range(len(sequences)) if step < counts[r]]
                freq = session.step(inputs)
                symbols = torch.tensor([sequences[r][step] for r in live])
                starts, sizes, totals = code_positions(freq[live], symbols)
                for k, r in enumerate(live):
                    code(r, [starts[k]], [sizes[k]], [totals[k]])
                    inputs[r] = self.tokenizer.model_input(sequences[r][step])
        return EncodedGroup([e.finish() for e in encoders], ideal)

    def decode_group(self, payloads: list[bytes], counts: list[int]) -> list[list[int]]:
        """Decode a group one position per step, all rows together through the KV cache."""
        decoders = [RangeDecoder(p) for p in payloads]
        sequences: list[list[int]] = [[] for _ in payloads]
        session = self.engine.session(len(payloads), max(counts))
        inputs = [self.tokenizer.prime_token] * len(payloads)
        for step in range(max(counts)):
            live = [r for r in range(len(payloads)) if step < counts[r]]
            freq = session.step(inputs)[live]

            def targets_for(totals: list[int], live: list[int] = live) -> list[int]:
                return [decoders[r].target(total) for r, total in zip(live, totals, strict=True)]

            symbols, starts, sizes = find_symbols(freq, targets_for)
            for r, symbol, start, size in zip(live, symbols, starts, sizes, strict=True):
                decoders[r].consume(start, size)
                sequences[r].append(symbol)
                inputs[r] = self.tokenizer.model_input(symbol)
        return sequences
