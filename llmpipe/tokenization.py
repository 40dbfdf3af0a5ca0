"""Lossless mapping between arbitrary bytes and token ids.

Decoding never goes through the tokenizer's own ``decode`` (which may
normalise, strip or re-space text): each token id maps to a fixed byte
string, and a token sequence decodes to the concatenation of its tokens'
bytes. That table is what an archive depends on, so its hash is what the
header records as the tokenizer identity.

Encoding splits a chunk into runs of valid UTF-8 and runs of invalid bytes.
Valid runs go through the tokenizer with special-token parsing turned off
(``<|endoftext|>`` in the input is just text); invalid bytes, and any run
whose tokens do not reproduce it exactly, are spelt with single-byte tokens.
Every chunk is checked against its bytes before it is used.

The coding alphabet is the model's vocabulary plus 256 *escape symbols*:
symbol ``V + b`` stands for the raw byte ``b``. They spell bytes the
vocabulary has no single-byte token for (SmolLM2 lacks 21, e.g. 0xFF), so
every byte string can be coded; the model sees the prime token in their place.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from tokenizers import Tokenizer

from llmpipe.errors import ModelError

ESCAPE_SYMBOLS = 256  # symbols V..V+255 code one raw byte each
_INVALID_RUN = re.compile("[\udc80-\udcff]+")  # invalid bytes after surrogateescape decoding


def _gpt2_unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode`` (the byte-level BPE alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            mapping[chr(256 + extra)] = b
            extra += 1
    return mapping


def _token_bytes_table(spec: dict, vocab_size: int) -> list[bytes | None]:
    """Bytes of every token id; ``None`` for ids that have no byte spelling."""
    table: list[bytes | None] = [None] * vocab_size
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ModelError(f"unsupported tokenizer model {model.get('type')!r} (only BPE is supported)")
    decoder = (spec.get("decoder") or {}).get("type")
    if decoder == "ByteLevel":
        alphabet = _gpt2_unicode_to_byte()
        for piece, token_id in model["vocab"].items():
            if token_id < vocab_size and all(c in alphabet for c in piece):
                table[token_id] = bytes(alphabet[c] for c in piece)
    elif model.get("byte_fallback"):  # SentencePiece-style: "▁" is a space, <0xNN> is a byte
        for piece, token_id in model["vocab"].items():
            if token_id >= vocab_size:
                continue
            match = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
            table[token_id] = bytes([int(match.group(1), 16)]) if match else piece.replace("▁", " ").encode()
    else:
        raise ModelError(f"unsupported tokenizer decoder {decoder!r}")
    for added in spec.get("added_tokens", []):
        if added["id"] < vocab_size:
            table[added["id"]] = added["content"].encode("utf-8")
    return [b if b else None for b in table]  # an empty spelling cannot carry data


class ByteTokenizer:
    """Tokenises any byte string and maps tokens back to bytes exactly."""

    def __init__(self, tokenizer_json: Path, vocab_size: int) -> None:
        spec = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
        self._tokenizer = Tokenizer.from_file(str(tokenizer_json))
        self._tokenizer.encode_special_tokens = True  # special-token text is ordinary text
        self.token_bytes = _token_bytes_table(spec, vocab_size)
        self.vocab_size = vocab_size
        byte_ids: dict[bytes, int] = {}
        for token_id, spelling in enumerate(self.token_bytes):
            if spelling is not None and len(spelling) == 1:
                byte_ids.setdefault(spelling, token_id)
        self._byte_symbol = [byte_ids.get(bytes([b]), vocab_size + b) for b in range(256)]
        self.alphabet_size = vocab_size + ESCAPE_SYMBOLS
        self.spellings = [b or b"" for b in self.token_bytes] + [bytes([b]) for b in range(ESCAPE_SYMBOLS)]
        self.prime_token = self._pick_prime_token(spec)
        self.sha256 = self._table_hash()

    @staticmethod
    def _pick_prime_token(spec: dict) -> int:
        """The token every chunk starts from: a document separator if the vocabulary has one."""
        by_content = {a["content"]: a["id"] for a in spec.get("added_tokens", [])}
        for name in ("<|endoftext|>", "</s>", "<s>", "<|begin_of_text|>"):
            if name in by_content:
                return by_content[name]
        return 0

    def _table_hash(self) -> str:
        digest = hashlib.sha256()
        for spelling in self.token_bytes:
            if spelling is None:
                digest.update(b"\xff\xff\xff\xff")
            else:
                digest.update(len(spelling).to_bytes(4, "little") + spelling)
        digest.update(self.prime_token.to_bytes(4, "little"))
        return digest.hexdigest()

    def encode(self, chunk: bytes) -> list[int]:
        """Symbols that decode to exactly ``chunk``."""
        text = chunk.decode("utf-8", errors="surrogateescape")
        pieces: list[tuple[str, bool]] = []  # (text, is_valid_utf8)
        last = 0
        for match in _INVALID_RUN.finditer(text):
            if match.start() > last:
                pieces.append((text[last : match.start()], True))
            pieces.append((match.group(), False))
            last = match.end()
        if last < len(text):
            pieces.append((text[last:], True))
        valid = [p for p, ok in pieces if ok]
        encoded = iter(self._tokenizer.encode_batch(valid, add_special_tokens=False)) if valid else iter(())
        ids: list[int] = []
        for piece, ok in pieces:
            raw = piece.encode("utf-8", errors="surrogateescape")
            piece_ids = next(encoded).ids if ok else None
            if piece_ids is None or not self._spells(piece_ids, raw):
                piece_ids = [self._byte_symbol[b] for b in raw]
            ids.extend(piece_ids)
        if not self._spells(ids, chunk):  # true by construction; cheap to check
            raise AssertionError("tokenisation does not reproduce its chunk")
        return ids

    def _spells(self, ids: list[int], data: bytes) -> bool:
        try:
            return self.decode(ids) == data
        except ValueError:
            return False

    def decode(self, symbols: list[int]) -> bytes:
        """Concatenate the symbols' bytes; raises ValueError for a symbol without a spelling."""
        try:
            data = [self.spellings[s] for s in symbols]
        except IndexError as exc:
            raise ValueError("symbol outside the alphabet") from exc
        if not all(data):
            raise ValueError("symbol without a byte spelling")
        return b"".join(data)

    def model_input(self, symbol: int) -> int:
        """The token the model is fed after ``symbol`` was coded."""
        return symbol if symbol < self.vocab_size else self.prime_token
