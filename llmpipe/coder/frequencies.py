"""Turn a row of logits into the integer frequency table the range coder uses.

Every token gets a frequency of at least 1 (so any token can be coded, even
one the model thinks impossible) and the table sums to at most
``2**FREQ_BITS``. The remaining mass is spread in proportion to the
softmax, rounded down. Computed in float64 from float32 logits; encoder and
decoder call this on identical logits, so they get identical tables.
"""

from __future__ import annotations

import numpy as np

FREQ_BITS = 28  # frequency total; loses < V / 2^28 of probability mass to the +1 floors


def frequency_tables(
    logits: np.ndarray, extra_symbols: int, freq_bits: int = FREQ_BITS
) -> tuple[np.ndarray, np.ndarray]:
    """Integer frequencies ``(B, V + extra)`` and the model's probabilities ``(B, V)``.

    The ``extra_symbols`` (escapes) get frequency 1 each; every row sums to at
    most ``2**freq_bits``. The float64 probabilities are returned for
    measuring the ideal code length; they play no part in coding.
    """
    x = logits.astype(np.float64)  # (B, V)
    x -= x.max(axis=1, keepdims=True)
    p = np.exp(x)
    rows, vocab = x.shape
    p /= p.sum(axis=1, keepdims=True)
    budget = float((1 << freq_bits) - vocab - extra_symbols)
    freq = np.ones((rows, vocab + extra_symbols), dtype=np.int64)
    freq[:, :vocab] += np.floor(p * budget).astype(np.int64)
    return freq, p
