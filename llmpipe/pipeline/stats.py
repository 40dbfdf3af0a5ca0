"""What a compression or decompression run did, for ``-v``, the progress line and the benchmarks.

One record for both directions, with the same meaning in each: ``original_bytes`` are the
uncompressed bytes (read when compressing, written when decompressing) and ``archive_bytes``
the archive's (written, or read).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmpipe.format.block import Row, RowKind


@dataclass
class Stats:
    original_bytes: int = 0
    archive_bytes: int = 0
    blocks: int = 0
    rows: dict[str, int] = field(default_factory=lambda: {k.name.lower(): 0 for k in RowKind})
    llm_input_bytes: int = 0
    llm_payload_bytes: int = 0
    llm_symbols: int = 0
    ideal_bits: float = 0.0
    seconds: float = 0.0
    model_load_seconds: float = 0.0
    damaged: list[str] = field(default_factory=list)  # blocks left out by a decoder told to keep going

    def add_coding(self, other: Stats) -> None:
        """Add what ``other``'s LLM rows coded (input and payload bytes, symbols, ideal bits)."""
        self.llm_input_bytes += other.llm_input_bytes
        self.llm_payload_bytes += other.llm_payload_bytes
        self.llm_symbols += other.llm_symbols
        self.ideal_bits += other.ideal_bits

    def count(self, rows: list[Row]) -> None:
        """A block of these rows was written (or verified)."""
        self.blocks += 1
        for row in rows:
            self.rows[row.kind.name.lower()] += 1

    @property
    def bits_per_byte(self) -> float:
        return 8 * self.archive_bytes / self.original_bytes if self.original_bytes else 0.0

    @property
    def coder_overhead(self) -> float:
        """Coded LLM payload bits over the model's ideal code length, minus one."""
        return 8 * self.llm_payload_bytes / self.ideal_bits - 1 if self.ideal_bits else 0.0
