"""A 64-bit range coder (the LZMA scheme widened to 64 bits).

Why our own: the coder is tiny, and owning it lets the format pin every
detail (byte order, carry handling, flush) in FORMAT.md, so a second decoder
can be written from the spec alone.

Scheme: ``low`` is a 64-bit value plus a carry bit, ``range`` is kept in
[2^56, 2^64) by shifting out one byte at a time. Symbols are coded with
integer frequencies ``(start, size, total)``; ``total`` may be anything up
to 2^32, so ``range // total >= 2^24`` and the truncation costs at most
2^-24 of a bit per symbol. Pending 0xFF bytes wait in ``cache`` until a
possible carry is resolved, exactly as in LZMA's ``ShiftLow``.

The first byte LZMA would emit is always 0 and is not written. The flush
writes the shortest value inside the final interval (``low`` rounded up to a
multiple of 2^56) and trailing zero bytes are dropped: the decoder reads
zeros past the end of its input, so a stream costs 1-2 bytes of flush.

>>> enc = RangeEncoder()
>>> for start, size in [(0, 3), (3, 1), (0, 3)]:
...     enc.encode(start, size, 4)
>>> data = enc.finish()
>>> dec = RangeDecoder(data)
>>> [dec.decode_symbol([0, 3, 4]) for _ in range(3)]
[0, 1, 0]
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence

_BITS = 64
_MASK = (1 << _BITS) - 1
_TOP = 1 << (_BITS - 8)  # range is renormalised to stay >= 2^56
_FF_BOUNDARY = 0xFF << (_BITS - 8)
MAX_TOTAL = 1 << 32  # largest frequency total a symbol may be coded with


class RangeEncoder:
    """Encodes symbols given as ``(start, size, total)`` integer intervals."""

    def __init__(self) -> None:
        self._low = 0
        self._range = _MASK
        self._cache = 0
        self._cache_size = 1
        self._skip_first = True  # the very first byte is always 0: not written
        self._out = bytearray()

    def encode(self, start: int, size: int, total: int) -> None:
        """Narrow the interval to ``[start, start + size)`` out of ``total``."""
        if not (start >= 0 and size > 0 and start + size <= total <= MAX_TOTAL):
            raise ValueError(f"bad symbol interval start={start} size={size} total={total}")
        r = self._range // total
        self._low += r * start
        self._range = r * size
        while self._range < _TOP:
            self._range <<= 8
            self._shift_low()

    def _shift_low(self) -> None:
        low = self._low
        if low < _FF_BOUNDARY or low > _MASK:
            carry = low >> _BITS
            self._emit(self._cache + carry)
            for _ in range(self._cache_size - 1):
                self._emit(0xFF + carry)
            self._cache_size = 0
            self._cache = (low >> (_BITS - 8)) & 0xFF
        self._cache_size += 1
        self._low = (low << 8) & _MASK

    def _emit(self, byte: int) -> None:
        if self._skip_first:
            self._skip_first = False
            return
        self._out.append(byte & 0xFF)

    def finish(self) -> bytes:
        """Flush and return the coded bytes; the encoder is spent afterwards."""
        self._low = (self._low + _TOP - 1) & ~(_TOP - 1)  # fewest non-zero bytes in [low, low+range)
        self._shift_low()
        self._shift_low()
        return bytes(self._out.rstrip(b"\x00"))


class RangeDecoder:
    """Decodes what :class:`RangeEncoder` wrote; reads zeros past the end of ``data``."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0
        self._range = _MASK
        self._code = 0
        self._r = 0
        for _ in range(_BITS // 8):
            self._code = (self._code << 8) | self._next_byte()

    def _next_byte(self) -> int:
        pos = self._pos
        self._pos = pos + 1
        return self._data[pos] if pos < len(self._data) else 0

    def target(self, total: int) -> int:
        """The value in ``[0, total)`` that identifies the next symbol's interval."""
        if not 0 < total <= MAX_TOTAL:
            raise ValueError(f"bad frequency total {total}")
        self._r = self._range // total
        return min(self._code // self._r, total - 1)

    def consume(self, start: int, size: int) -> None:
        """Remove the symbol ``[start, start + size)`` found with :meth:`target`."""
        self._code -= self._r * start
        self._range = self._r * size
        while self._range < _TOP:
            self._code = ((self._code << 8) | self._next_byte()) & ((1 << (_BITS + 8)) - 1)
            self._range <<= 8

    def decode_symbol(self, cumulative: Sequence[int]) -> int:
        """Decode with a cumulative table ``[0, c1, ..., total]``; returns the symbol index."""
        total = cumulative[-1]
        symbol = bisect_right(cumulative, self.target(total)) - 1
        self.consume(cumulative[symbol], cumulative[symbol + 1] - cumulative[symbol])
        return symbol

    @property
    def bytes_read(self) -> int:
        """How many input bytes the decoder has looked at (may exceed ``len(data)``)."""
        return self._pos
