"""The stream header: version 3's binary record, and version 2's zstd-compressed JSON (read only).

In memory a header is a dict (the same fields in both versions, FORMAT.md
section 2): ``model`` (``name``, ``arch``, ``vocab_size`` and, in version 3,
``id``: 16 bytes of SHA-256 over the weights and tokenizer hashes, as hex),
``chunk_size``, ``batch``, ``context``, ``prime_token``, ``coder``,
``numerics``, ``mixer``, ``steering`` and the writer's version ``llmpipe``.
A stream with no LLM block needs no model: its header is ``{"model": None}``
and costs 13 bytes. Version 3 writes every field as a byte, a varint or a
length-prefixed string, in a fixed order, then an extension area of
``tag | length | value`` entries that a reader skips, so later writers can
add fields without a new version.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct

import zstandard

from llmpipe.errors import ArchiveError
from llmpipe.format.fields import (
    MAX_CHUNK_SIZE,
    MAX_CONTEXT,
    MAX_HEADER_BYTES,
    MAX_ROWS,
    RecordReader,
    RecordWriter,
    crc32,
    encode_varint,
)

MAGIC = b"\xfaLLMP\x00"  # 0xFA is never valid UTF-8
VERSION = 3
READABLE_VERSIONS = (2, 3)
FLAG_MODEL = 0x01
"""Stream flag: the header names a model and coding settings (the stream may hold LLM rows)."""
MODEL_ID_BYTES = 16
MAX_NAME_BYTES = 255
MAX_VOCAB = 1 << 24
MAX_STEERING_TOKENS = 256

ARCHS = ("llama", "gpt_neox", "gpt2")  # codes 1, 2, 3
CODER = {"name": "range64", "freq_bits": 28, "escape_symbols": 256}  # code 1: the only coder
MIXER_NAME = "ngram-match"
STEERING_MODES = ("text", "random", "learned")  # codes 1, 2, 3; 0: none
QUANTISERS = ("uniform", "lloyd")  # codes 1, 2
PRIORS = ("gaussian", "empirical")  # codes 1, 2
NUMERICS_EXACT, NUMERICS_FLOAT = 1, 2
KNOWN_MODELS = {"40c376b2c6cfce96d80740c5bb114290": "smollm2-135m-instruct-q4_1"}
"""Model ids whose name the record leaves out (empty): llmpipe's default model (FORMAT.md section 2). Its
name is 27 bytes, a fifth of the archive of a 256-byte text."""


def model_id(weights_sha256: str, tokenizer_sha256: str) -> str:
    """The model identity a version 3 header stores (hex): SHA-256 of both hashes' 64 bytes, first 16 bytes."""
    digest = hashlib.sha256(bytes.fromhex(weights_sha256) + bytes.fromhex(tokenizer_sha256)).digest()
    return digest[:MODEL_ID_BYTES].hex()


def _code(values: tuple[str, ...], value: object, what: str) -> int:
    if value not in values:
        raise ValueError(f"{what} {value!r} has no code in format version {VERSION}")
    return values.index(value) + 1


def _named(values: tuple[str, ...], code: int, reader: RecordReader, what: str) -> str:
    if not 1 <= code <= len(values):
        raise reader.fail(f"unknown {what} code {code}")
    return values[code - 1]


def stream_header_bytes(header: dict) -> bytes:
    """``magic | version | flags | varint L | record (L bytes) | CRC32 of version..record``."""
    flags, record = encode_record(header)
    if len(record) > MAX_HEADER_BYTES:
        raise ValueError("header too large")
    body = bytes([VERSION, flags]) + encode_varint(len(record)) + record
    return MAGIC + body + struct.pack("<I", crc32(body))


def encode_record(header: dict) -> tuple[int, bytes]:
    """The stream flags and the binary record of ``header`` (FORMAT.md section 2)."""
    out = RecordWriter()
    model = header.get("model")
    if model is None:
        return 0, bytes(out.data)
    known = KNOWN_MODELS.get(model["id"]) == model["name"]
    out.text(header["llmpipe"]).raw(bytes.fromhex(model["id"])).text("" if known else model["name"])
    out.byte(_code(ARCHS, model["arch"], "architecture")).varint(model["vocab_size"])
    out.varint(header["prime_token"]).varint(header["chunk_size"]).varint(header["batch"])
    out.varint(header["context"]["window"]).varint(header["context"]["overlap"])
    if header["coder"] != CODER:
        raise ValueError(f"coder {header['coder']!r} has no code in format version {VERSION}")
    out.byte(1)
    numerics = header["numerics"]
    if numerics.get("engine") == "exact":
        out.byte(NUMERICS_EXACT).varint(numerics["version"])
    else:
        out.byte(NUMERICS_FLOAT).text(json.dumps(numerics, sort_keys=True, separators=(",", ":")))
    mixer = header["mixer"]
    if mixer is not None and mixer.get("name") != MIXER_NAME:
        raise ValueError(f"mixer {mixer!r} has no code in format version {VERSION}")
    out.varint(0 if mixer is None else mixer["version"])
    steering = header["steering"]
    if steering is None:
        out.byte(0)
    else:
        out.byte(_code(STEERING_MODES, steering["mode"], "steering mode")).blob(_steering_body(steering))
    return FLAG_MODEL, bytes(out.data)


def decode_record(flags: int, record: bytes) -> dict:
    """The header dict of a version 3 record; structure and enumerations are checked here, values against
    the decoder's limits by the pipeline (``stream_settings``)."""
    reader = RecordReader(record, "header")
    header: dict = {"model": None}
    if flags & FLAG_MODEL:
        header["llmpipe"] = reader.text(64)
        identity = reader.raw(MODEL_ID_BYTES).hex()
        name = reader.text(MAX_NAME_BYTES) or KNOWN_MODELS.get(identity, "")
        arch = _named(ARCHS, reader.byte(), reader, "architecture")
        header["model"] = {"name": name, "arch": arch, "vocab_size": reader.varint(MAX_VOCAB), "id": identity}
        header["prime_token"] = reader.varint(MAX_VOCAB)
        header["chunk_size"] = reader.varint(MAX_CHUNK_SIZE)
        header["batch"] = reader.varint(MAX_ROWS)
        window = reader.varint(MAX_CONTEXT)
        header["context"] = {"window": window, "overlap": reader.varint(MAX_CONTEXT)}
        if (coder := reader.byte()) != 1:
            raise reader.fail(f"unknown coder code {coder}")
        header["coder"] = dict(CODER)
        header["numerics"] = _numerics(reader)
        mixer = reader.varint(255)
        header["mixer"] = {"name": MIXER_NAME, "version": mixer} if mixer else None
        mode = reader.byte()
        header["steering"] = None
        if mode:
            body = RecordReader(reader.blob(len(record)), "header steering record")
            header["steering"] = _steering_record(_named(STEERING_MODES, mode, reader, "steering mode"), body)
    while reader.left:  # the extension area: entries for later fields, skipped
        reader.varint()
        reader.blob(reader.left)
    return header


def _numerics(reader: RecordReader) -> dict:
    engine = reader.byte()
    if engine == NUMERICS_EXACT:
        return {"engine": "exact", "version": reader.varint(255)}
    if engine == NUMERICS_FLOAT:
        try:
            numerics = json.loads(reader.text(4096))
        except ValueError:
            raise reader.fail("float numerics record is not JSON") from None
        if not isinstance(numerics, dict) or numerics.get("engine") != "float":
            raise reader.fail("float numerics record")
        return numerics
    raise reader.fail(f"unknown numerics engine code {engine}")


def _steering_body(record: dict) -> bytes:
    out = RecordWriter()
    mode = record["mode"]
    if mode == "text":
        out.text(record["text"]).varint(len(record["tokens"]))
        for token in record["tokens"]:
            out.varint(token)
    elif mode == "random":
        out.varint(record["tokens"]).varint(record["seed"]).float64(record["scale"])
    else:
        out.varint(record["tokens"]).byte(_code(QUANTISERS, record["quantiser"], "quantiser"))
        out.float64(record["step"]).byte(_code(PRIORS, record["prior"], "prior"))
        if record["prior"] == "gaussian":
            out.varint(record["prior_scale"])
        else:
            out.signed(record["low"]).signed(record["high"])
        if record["quantiser"] == "lloyd":
            out.varint(len(record["levels"]))
            for level in record["levels"]:
                out.signed(level)
        out.raw(base64.b64decode(record["data"]))
    return bytes(out.data)


def _steering_record(mode: str, body: RecordReader) -> dict:
    """The steering dict (``steering.prompt``'s record; learned data as base64, as in memory everywhere)."""
    if mode == "text":
        text = body.text(1 << 16)
        tokens = [body.varint(MAX_VOCAB) for _ in range(body.varint(MAX_STEERING_TOKENS))]
        record: dict = {"mode": mode, "text": text, "tokens": tokens}
    elif mode == "random":
        record = {"mode": mode, "tokens": body.varint(MAX_STEERING_TOKENS), "seed": body.varint()}
        record["scale"] = body.float64()
    else:
        record = {"mode": mode, "tokens": body.varint(MAX_STEERING_TOKENS)}
        record["quantiser"] = _named(QUANTISERS, body.byte(), body, "quantiser")
        record["step"] = body.float64()
        record["prior"] = _named(PRIORS, body.byte(), body, "prior")
        if record["prior"] == "gaussian":
            record["prior_scale"] = body.varint(1 << 16)
        else:
            record["low"], record["high"] = body.signed(1 << 16), body.signed(1 << 16)
        if record["quantiser"] == "lloyd":
            record["levels"] = [body.signed(1 << 24) for _ in range(body.varint(256))]
        record["data"] = base64.b64encode(body.raw(body.left)).decode()
    if body.left:
        raise body.fail("bytes after the record")
    return record


def decode_json_header(body: bytes, limit: int) -> dict:
    """A version 2 header: one zstd frame of UTF-8 JSON (at most ``limit`` bytes decompressed)."""
    try:
        text = zstandard.ZstdDecompressor().decompress(body, max_output_size=limit)
        header = json.loads(text)
    except (zstandard.ZstdError, ValueError) as exc:
        raise ArchiveError(f"corrupt header: {exc}") from None
    if not isinstance(header, dict):
        raise ArchiveError("corrupt header: not an object")
    return header

