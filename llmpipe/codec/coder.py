"""LLM coding of a group of chunks: the heart of llmpipe.

Each chunk is one sequence of symbols, coded into its own range-coder
stream. A chunk starts from the tokenizer's prime token and never sees
another chunk, so every chunk is independently decodable.

The decoder advances all chunks of a group together, one position per step
through a KV cache (:meth:`LlmCoder.decode_group`). The encoder does the
same with the float engine, whose numbers are only reproducible on the
same schedule; with the exact engine it scores each chunk's positions in
full-sequence passes instead, which gives identical tables much faster.

A :class:`ContextWindow` bounds what a position sees: past ``window``
inputs the context restarts from the prime token and the last ``overlap``
inputs, the same way on both sides, so long chunks cost bounded attention
and memory per step.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from llmpipe.codec.adaptive_bias import AdaptiveBias
from llmpipe.codec.context import ContextWindow
from llmpipe.codec.frequencies import code_positions, frequency_tables
from llmpipe.codec.memory import HISTORY_SYMBOLS, check_history_budget
from llmpipe.codec.mixer import (
    RowHistory,
    code_run,
    decode_symbols,
    learn_step,
    lm_sizes,
    mix_step,
    predict_step,
    row_totals,
)
from llmpipe.codec.range_coder import RangeDecoder, RangeEncoder
from llmpipe.engine.protocol import Engine
from llmpipe.tokenization import ESCAPE_SYMBOLS, ByteTokenizer


@dataclass
class EncodedGroup:
    payloads: list[bytes]
    ideal_bits: list[float]  # each chunk's code length under its own frequency tables, -sum log2(f / total)


class LlmCoder:
    """Encodes and decodes groups of symbol sequences with one engine and tokenizer."""

    def __init__(self, engine: Engine, tokenizer: ByteTokenizer) -> None:
        self.engine = engine
        self.tokenizer = tokenizer

    def _inputs(self, sequence: list[int]) -> list[int]:
        """``x_0..x_{t-1}``: the prime token, then each symbol's model input but the last's."""
        return [self.tokenizer.prime_token] + [self.tokenizer.model_input(s) for s in sequence[:-1]]

    def encode_group(self, sequences: list[list[int]], context: ContextWindow, mixer_version: int) -> EncodedGroup:
        """Code each sequence into its own payload; ``mixer_version`` (``mixer.VERSIONS``, 0: none) says
        whether each row's tables are biased (``adaptive_bias``) and mixed with its history (``mixer``)."""
        encoders = [RangeEncoder() for _ in sequences]
        if mixer_version:
            check_history_budget(sum(len(s) for s in sequences))
        histories = [RowHistory() for _ in sequences] if mixer_version else None
        biases = AdaptiveBias(len(sequences), self.tokenizer.alphabet_size) if mixer_version >= 2 else None
        ideal = [0.0] * len(sequences)

        def code(row: int, starts: list[int], sizes: list[int], totals: list[int]) -> None:
            encoder = encoders[row]
            for start, size, total in zip(starts, sizes, totals, strict=True):
                encoder.encode(start, size, total)
            ideal[row] += float(np.log2(np.array(totals, dtype=np.float64) / np.array(sizes)).sum())

        if self.engine.full_sequence:
            segments: list[tuple[int, int]] = []  # (row, first symbol) of each pass input below
            inputs: list[list[int]] = []
            skips: list[int] = []
            prime = self.tokenizer.prime_token
            for row, sequence in enumerate(sequences):
                x = self._inputs(sequence)
                starts = context.starts(len(x))
                for a, b in zip(starts, [*starts[1:], len(x)], strict=True):
                    segment = x[:b] if a == 0 else [prime] + x[a - context.overlap + 1 : b]
                    segments.append((row, a))
                    inputs.append(segment)
                    skips.append(len(segment) - (b - a))
            for index, first, logits in self.engine.scores(inputs, skips):
                freq = frequency_tables(logits, ESCAPE_SYMBOLS)
                row, a = segments[index]
                run = sequences[row][a + first : a + first + len(freq)]
                totals = sizes = None
                if biases:
                    freq, totals, sizes = biases.run(row, freq, run)
                if histories:
                    if totals is None:  # mixer version 1: the model's own tables
                        totals, sizes = freq.sum(dim=1).tolist(), lm_sizes(freq, run)
                    code(row, *code_run(freq, run, histories[row].predict_run(run, totals, sizes)))
                else:
                    code(row, *code_positions(freq, torch.tensor(run)))
        else:  # replay the decoder's schedule exactly
            counts = [len(s) for s in sequences]
            for step, live, freq in self._lockstep(counts, context, lambda step, r: sequences[r][step]):
                run = [sequences[r][step] for r in live]
                table = freq[live]
                if biases:
                    table = biases.tables(table, live)
                    biases.learn(table, live, run)
                if histories:
                    table = mix_step(table, [histories[r] for r in live], run)
                starts, sizes, totals = code_positions(table, torch.tensor(run))
                for k, r in enumerate(live):
                    code(r, [starts[k]], [sizes[k]], [totals[k]])
        return EncodedGroup([e.finish() for e in encoders], ideal)

    def decode_group(
        self, payloads: list[bytes], counts: list[int], context: ContextWindow, mixer_version: int
    ) -> list[list[int]]:
        """Decode a group one position per step, all rows together through the KV cache."""
        if self.engine.full_sequence:
            # exact tables do not depend on the batch: decode the rows in parts whose KV cache and histories
            # fit in memory (one part over a limit is a single row: refused below)
            parts = self._parts_that_fit(counts, context, mixer_version > 0)
            if len(parts) > 1:
                return [
                    row
                    for a, b in parts
                    for row in self.decode_group(payloads[a:b], counts[a:b], context, mixer_version)
                ]
        decoders = [RangeDecoder(p) for p in payloads]
        sequences: list[list[int]] = [[] for _ in payloads]
        if mixer_version:  # before any work: the counts come from the archive
            check_history_budget(sum(counts))
        histories = [RowHistory() for _ in payloads] if mixer_version else None
        biases = AdaptiveBias(len(payloads), self.tokenizer.alphabet_size) if mixer_version >= 2 else None
        for _step, live, freq in self._lockstep(counts, context, lambda step, r: sequences[r][step]):
            rows = live
            if biases:  # the biased tables of the live rows, searched below as rows 0, 1, ...
                freq = biases.tables(freq if len(live) == len(payloads) else freq[live], live)
                rows = list(range(len(live)))

            def targets_for(totals: list[int], live: list[int] = live) -> list[int]:
                return [decoders[r].target(total) for r, total in zip(live, totals, strict=True)]

            predictions = None
            if histories:
                live_histories = [histories[r] for r in live]
                predictions = predict_step(row_totals(freq, rows), live_histories)
            symbols, starts, sizes, lm_sizes = decode_symbols(freq, rows, predictions, targets_for)
            if biases:
                biases.learn(freq, live, symbols)
            if histories:
                learn_step(live_histories, predictions, symbols, lm_sizes)
            for r, symbol, start, size in zip(live, symbols, starts, sizes, strict=True):
                decoders[r].consume(start, size)
                sequences[r].append(symbol)
        return sequences

    def _parts_that_fit(self, counts: list[int], context: ContextWindow, mixing: bool) -> list[tuple[int, int]]:
        """Consecutive ``(start, end)`` runs of rows whose KV cache fits the engine's limit and, when mixing,
        whose histories hold at most :data:`HISTORY_SYMBOLS` symbols (a row over a limit alone)."""
        parts: list[tuple[int, int]] = []
        start, held, longest = 0, 0, 0
        for end, count in enumerate(counts):
            positions = max(longest, context.longest_context(count))
            kv = (end - start + 1) * positions * self.engine.kv_bytes_per_position
            if end > start and (kv > self.engine.kv_limit or mixing and held + count > HISTORY_SYMBOLS):
                parts.append((start, end))
                start, held, positions = end, 0, context.longest_context(count)
            held += count
            longest = positions
        parts.append((start, len(counts)))
        return parts

    def _lockstep(self, counts: list[int], context: ContextWindow, symbol_at) -> Iterator[tuple[int, list, object]]:
        """The decoder's schedule: yields ``(step, live rows, tables)``; the caller settles each live row's
        symbol of that step (``symbol_at(step, row)`` must then return it) before the next one."""
        rows = len(counts)
        prime = self.tokenizer.prime_token
        session = self.engine.session(rows, context.longest_context(max(counts)))
        history: list[list[int]] = [[prime] for _ in range(rows)]  # x_0..x_step of every row
        restarts = set(context.starts(max(counts))[1:])
        for step in range(max(counts)):
            if step in restarts:
                session.restart([[prime] + h[step - context.overlap + 1 : step] for h in history])
            live = [r for r in range(rows) if step < counts[r]]
            yield step, live, frequency_tables(session.step([h[step] for h in history]), ESCAPE_SYMBOLS)
            for r in range(rows):
                history[r].append(self.tokenizer.model_input(symbol_at(step, r)) if step < counts[r] else prime)
