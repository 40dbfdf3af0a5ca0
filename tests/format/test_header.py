"""The version 3 stream header: every header a writer can make comes back the same, in few bytes."""

import base64
import hashlib
import io
import json
import struct
import zlib

import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from llmpipe.errors import ArchiveError
from llmpipe.format.container import ContainerReader
from llmpipe.format.fields import RecordWriter, encode_varint
from llmpipe.format.header import (
    KNOWN_MODELS,
    MAGIC,
    decode_record,
    encode_record,
    model_id,
    stream_header_bytes,
)

MODEL = {"name": "smollm2-135m-instruct-q4_1", "arch": "llama", "vocab_size": 49152, "id": "ab" * 16}


def header(**changes) -> dict:
    """A header as ``Compressor.header()`` makes it at the defaults."""
    base = {
        "llmpipe": "0.6.0",
        "model": MODEL,
        "chunk_size": 32768,
        "batch": 64,
        "context": {"window": 2048, "overlap": 512},
        "prime_token": 0,
        "coder": {"name": "range64", "freq_bits": 28, "escape_symbols": 256},
        "numerics": {"engine": "exact", "version": 1},
        "mixer": {"name": "ngram-match", "version": 2},
        "steering": None,
    }
    return {**base, **changes}


def read(data: bytes) -> dict | None:
    return ContainerReader(io.BytesIO(data), "t").read_stream_header(first=True)


steering = st.one_of(
    st.none(),
    st.builds(
        lambda text, tokens: {"mode": "text", "text": text, "tokens": tokens},
        st.text(max_size=40),
        st.lists(st.integers(0, 49151), min_size=1, max_size=256),
    ),
    st.builds(
        lambda n, seed, scale: {"mode": "random", "tokens": n, "seed": seed, "scale": scale},
        st.integers(1, 256),
        st.integers(0, 2**62),
        st.floats(1e-6, 1e5),
    ),
    st.builds(
        lambda n, exponent, k, data: {
            "mode": "learned",
            "tokens": n,
            "quantiser": "uniform",
            "step": 2.0**exponent,
            "prior": "gaussian",
            "prior_scale": k,
            "data": base64.b64encode(data).decode(),
        },
        st.integers(1, 256),
        st.integers(-20, 5),
        st.integers(1, 1024),
        st.binary(max_size=300),
    ),
    st.builds(
        lambda n, levels, data: {
            "mode": "learned",
            "tokens": n,
            "quantiser": "lloyd",
            "step": 0.125,
            "levels": levels,
            "prior": "empirical",
            "low": 0,
            "high": len(levels) - 1,
            "data": base64.b64encode(data).decode(),
        },
        st.integers(1, 256),
        st.lists(st.integers(-(2**23), 2**23), min_size=1, max_size=256),
        st.binary(max_size=300),
    ),
)


@given(
    chunk=st.integers(1, 16 << 20),
    batch=st.integers(1, 4096),
    window=st.integers(0, 1 << 20),
    overlap=st.integers(0, 1 << 20),
    prime=st.integers(0, 49151),
    mixer=st.sampled_from([None, 1, 2]),
    arch=st.sampled_from(["llama", "gpt_neox", "gpt2"]),
    name=st.text(max_size=80).filter(lambda s: len(s.encode()) <= 255),
    prompt=steering,
)
def test_every_header_round_trips(chunk, batch, window, overlap, prime, mixer, arch, name, prompt):
    made = header(
        model={**MODEL, "name": name, "arch": arch},
        chunk_size=chunk,
        batch=batch,
        context={"window": window, "overlap": overlap},
        prime_token=prime,
        mixer={"name": "ngram-match", "version": mixer} if mixer else None,
        steering=prompt,
    )
    assert read(stream_header_bytes(made)) == made


def test_float_numerics_round_trip():
    numerics = {"engine": "float", "dtype": "float16", "device": "cuda", "threads": 2, "batch": 64, "torch": "2.13"}
    made = header(numerics=numerics)
    assert read(stream_header_bytes(made)) == made


def test_default_header_is_under_100_bytes_and_a_modelless_one_13():
    assert len(stream_header_bytes(header())) <= 100
    assert len(stream_header_bytes({"model": None})) == 13
    assert read(stream_header_bytes({"model": None})) == {"model": None}


def test_the_default_models_name_is_left_out_and_restored():
    """The known model ids (FORMAT.md section 2) need no name: the default model's header is 54 bytes."""
    (known_id, name), *_ = KNOWN_MODELS.items()
    default = header(model={**MODEL, "id": known_id, "name": name})
    assert len(stream_header_bytes(default)) == len(stream_header_bytes(header())) - len(MODEL["name"]) == 54
    assert read(stream_header_bytes(default)) == default
    renamed = header(model={**MODEL, "id": known_id, "name": "my-copy"})  # another name is kept
    assert read(stream_header_bytes(renamed)) == renamed


def test_extension_area_is_skipped():
    flags, record = encode_record(header())
    extended = record + bytes(RecordWriter().varint(7).blob(b"a later field").data)
    assert decode_record(flags, extended) == header()


def test_model_id_is_sha256_of_both_hashes():
    expected = hashlib.sha256(bytes(32) + b"\x11" * 32).hexdigest()[:32]
    assert model_id("00" * 32, "11" * 32) == expected
    assert model_id("00" * 32, "11" * 32) != model_id("11" * 32, "00" * 32)


@pytest.mark.parametrize(
    "patch, message",
    [
        (lambda r: r.replace(b"\x01\x80\x80\x03", b"\x09\x80\x80\x03", 1), "unknown architecture"),
        (lambda r: r[:-5], "ends inside"),
        (lambda r: r[:10], "ends inside"),
    ],
)
def test_damaged_records_are_refused(patch, message):
    flags, record = encode_record(header())
    with pytest.raises(ArchiveError, match=message):
        decode_record(flags, patch(record))


def test_unwritable_settings_are_refused_by_the_writer():
    with pytest.raises(ValueError, match="architecture"):
        stream_header_bytes(header(model={**MODEL, "arch": "rwkv"}))
    with pytest.raises(ValueError, match="coder"):
        stream_header_bytes(header(coder={"name": "ans"}))


def test_a_version_2_header_is_still_read():
    body = zstandard.ZstdCompressor().compress(json.dumps({"chunk_size": 5}).encode())
    data = MAGIC + bytes([2, 0]) + struct.pack("<II", len(body), zlib.crc32(body)) + body
    reader = ContainerReader(io.BytesIO(data), "t")
    assert reader.read_stream_header(first=True) == {"chunk_size": 5}
    assert reader.version == 2


def test_header_size_limit_is_checked_before_reading():
    data = MAGIC + bytes([3, 1]) + encode_varint(1 << 30)
    with pytest.raises(ArchiveError, match="above"):
        read(data)
