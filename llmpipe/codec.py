"""LLM coding of a group of chunks in lockstep: the heart of llmpipe.

Each chunk is one sequence of symbols, coded into its own range-coder
stream. All chunks of a group advance together one position per step, so
one batched model call serves them all; encoder and decoder run the very same
schedule (:func:`_run_lockstep`), which the float engine needs for bit-exact
probabilities. A chunk starts from the tokenizer's prime token and never sees
another chunk, so every chunk is independently decodable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from llmpipe.coder.frequencies import frequency_tables
from llmpipe.coder.range_coder import RangeDecoder, RangeEncoder
from llmpipe.engine.float_engine import FloatEngine
from llmpipe.tokenization import ESCAPE_SYMBOLS, ByteTokenizer

# visit(row, step, freq_row, cumulative_row, probability_row) -> the symbol coded at that position
_Visitor = Callable[[int, int, np.ndarray, np.ndarray, np.ndarray], int]


@dataclass
class EncodedGroup:
    payloads: list[bytes]
    ideal_bits: list[float]  # the model's own -log2 p of each chunk's symbols


class LlmCoder:
    """Encodes and decodes groups of symbol sequences with one engine and tokenizer."""

    def __init__(self, engine: FloatEngine, tokenizer: ByteTokenizer) -> None:
        self.engine = engine
        self.tokenizer = tokenizer

    def _run_lockstep(self, counts: list[int], visit: _Visitor) -> None:
        rows, steps = len(counts), max(counts)
        session = self.engine.session(rows, steps)
        inputs = [self.tokenizer.prime_token] * rows
        for step in range(steps):
            logits = session.step(inputs)  # (rows, V)
            freq, probs = frequency_tables(logits, ESCAPE_SYMBOLS)  # (rows, V + 256)
            cumulative = np.cumsum(freq, axis=1)  # inclusive: cumulative[s] = end of symbol s
            for row in range(rows):
                if step < counts[row]:
                    symbol = visit(row, step, freq[row], cumulative[row], probs[row])
                    inputs[row] = self.tokenizer.model_input(symbol)

    def encode_group(self, sequences: list[list[int]]) -> EncodedGroup:
        encoders = [RangeEncoder() for _ in sequences]
        ideal = [0.0] * len(sequences)

        def visit(row: int, step: int, freq: np.ndarray, cumulative: np.ndarray, probs: np.ndarray) -> int:
            symbol = sequences[row][step]
            size = int(freq[symbol])
            total = int(cumulative[-1])
            encoders[row].encode(int(cumulative[symbol]) - size, size, total)
            # escapes have no model probability: count them at their coded cost
            p = float(probs[symbol]) if symbol < len(probs) else 0.0
            ideal[row] -= np.log2(p) if p > 0 else np.log2(size / total)
            return symbol

        self._run_lockstep([len(s) for s in sequences], visit)
        return EncodedGroup([e.finish() for e in encoders], ideal)

    def decode_group(self, payloads: list[bytes], counts: list[int]) -> list[list[int]]:
        decoders = [RangeDecoder(p) for p in payloads]
        sequences: list[list[int]] = [[] for _ in payloads]

        def visit(row: int, step: int, freq: np.ndarray, cumulative: np.ndarray, probs: np.ndarray) -> int:
            decoder = decoders[row]
            target = decoder.target(int(cumulative[-1]))
            symbol = int(np.searchsorted(cumulative, target, side="right"))
            size = int(freq[symbol])
            decoder.consume(int(cumulative[symbol]) - size, size)
            sequences[row].append(symbol)
            return symbol

        self._run_lockstep(counts, visit)
        return sequences
