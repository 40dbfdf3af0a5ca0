"""Generate damaged and hostile variants of a valid archive, and check each is refused.

    python -m tests.bad_archives   # builds the tiny model, runs every case, prints the counts

Nothing here is a committed binary: every case is derived from an archive made
on the spot. For each case the decoder must raise an :class:`LlmpipeError`
(one clear message), write only a prefix of the original made of verified
blocks, and never raise anything else.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import zstandard

from llmpipe.errors import LlmpipeError
from llmpipe.format.container import FOOTER_SIZE, MAGIC, encode_varint, index_and_footer_bytes
from llmpipe.pipeline.decompress import Decompressor


@dataclass
class Case:
    name: str
    data: bytes


def split_header(archive: bytes) -> tuple[dict, bytes]:
    size = struct.unpack("<I", archive[8:12])[0]
    header = json.loads(zstandard.ZstdDecompressor().decompress(archive[16 : 16 + size]))
    return header, archive[16 + size :]


def with_header(archive: bytes, header: dict) -> bytes:
    """The same one-stream archive with its header replaced (valid CRCs and index: only the contents are wrong)."""
    before_index, _, count, total, entries = split_index(archive)
    _, blocks = split_header(before_index)
    body = zstandard.ZstdCompressor().compress(json.dumps(header).encode())
    head = archive[:8] + struct.pack("<II", len(body), zlib.crc32(body)) + body
    return head + blocks + index_and_footer_bytes(len(head), count, total, entries)


def split_index(archive: bytes) -> tuple[bytes, int, int, int, bytes]:
    """A one-stream archive as (everything before the index, header size, block count, total, entries)."""
    (index_size,) = struct.unpack("<Q", archive[-12:-4])
    start = len(archive) - FOOTER_SIZE - index_size
    index = archive[start : start + index_size - 4]
    fields, pos = [], 2
    for _ in range(3):
        value = shift = 0
        while True:
            byte = index[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        fields.append(value)
    return archive[:start], fields[0], fields[1], fields[2], index[pos:]


def with_index(archive: bytes, header_size: int, count: int, total: int, entries: bytes) -> bytes:
    """The same blocks with another (well-formed, correctly checksummed) index."""
    return split_index(archive)[0] + index_and_footer_bytes(header_size, count, total, entries)


def cases(archive: bytes, other_model_archive: bytes) -> Iterator[Case]:
    for cut in range(len(archive)):
        yield Case(f"truncated at {cut}", archive[:cut])
    for position in range(len(archive)):
        for bit in range(8):
            damaged = bytearray(archive)
            damaged[position] ^= 1 << bit
            yield Case(f"bit {bit} of byte {position} flipped", bytes(damaged))
    yield Case("empty input", b"")
    yield Case("wrong magic", b"\x89PNG\r\n" + archive[6:])
    yield Case("unknown version", MAGIC + b"\x07" + archive[7:])
    yield Case("reserved stream flags", MAGIC + b"\x01\x40" + archive[8:])
    yield Case("trailing garbage", archive + b"garbage")
    yield Case("trailing partial magic", archive + MAGIC[:3])
    yield Case("another model's archive", other_model_archive)
    yield Case("missing footer", archive[:-FOOTER_SIZE])
    yield Case("missing index and footer", split_index(archive)[0])
    _, header_size, count, total, entries = split_index(archive)
    yield Case("index lists a block too few", with_index(archive, header_size, count - 1, total, entries[:-3]))
    yield Case("index says another total", with_index(archive, header_size, count, total + 1, entries))
    yield Case("index says another header size", with_index(archive, header_size + 1, count, total, entries))
    yield Case("index block count 2^62", with_index(archive, header_size, 1 << 62, total, entries))
    yield Case("index entry changed", with_index(archive, header_size, count, total, entries[:-1] + b"\x05"))
    blocks = archive[header_size : len(split_index(archive)[0])]
    huge = bytes([3, 1]) + encode_varint(1 << 40) + blocks[2:]
    yield Case("block size 2^40", archive[:header_size] + huge)
    yield Case("token count beyond the block", archive[:header_size] + blocks[:2] + b"\x7f\x01\x7f\x01" + blocks[6:])
    header, _ = split_header(archive)
    for path, value in [
        ("batch", 0),
        ("batch", 10**9),
        ("batch", "64"),
        ("numerics.version", 2),
        ("numerics.version", None),
        ("chunk_size", 0),
        ("chunk_size", 2**62),
        ("prime_token", 10**6),
        ("model.weights_sha256", "0" * 64),
        ("numerics.engine", "quantum"),
        ("numerics", None),
        ("context.window", -1),
        ("context.window", 2**40),
        ("context.overlap", 10**6),
        ("context", None),
        ("mixer.version", 2),
        ("mixer.name", "cm"),
        ("mixer", [1]),
        ("mixer", None),  # a valid header, but not the one the blocks were coded with: checksums must catch it
    ]:
        changed = json.loads(json.dumps(header))
        target = changed
        *parents, leaf = path.split(".")
        for key in parents:
            target = target[key]
        target[leaf] = value
        yield Case(f"header {path}={value!r}", with_header(archive, changed))


def check(decompressor: Decompressor, original: bytes, case: Case) -> str | None:
    """None if the decoder behaved, else what went wrong.

    Each case goes through both decoders: front to back (pipes) and
    through the index (``--range``, ``--resume``, ``--keep-going``).
    """
    for path in ("front to back", "through the index"):
        sink = io.BytesIO()
        try:
            if path == "front to back":
                decompressor.decompress_stream(io.BytesIO(case.data), sink)
            else:
                decompressor.decompress_range(io.BytesIO(case.data), sink, "case")
        except LlmpipeError as exc:
            message = str(exc)
            if not message or "\n" in message:
                return f"{case.name} ({path}): message is not one line: {message!r}"
            if not original.startswith(sink.getvalue()):
                return f"{case.name} ({path}): wrote bytes that are not a prefix of the original"
            continue
        except Exception as exc:  # noqa: BLE001 - any other exception is the bug being looked for
            return f"{case.name} ({path}): {type(exc).__name__}: {exc}"
        if sink.getvalue() != original:
            return f"{case.name} ({path}): decoded without error to different bytes"
    return None  # a flip that changes nothing that matters (none expected, but harmless)


def run_all(decompressor: Decompressor, original: bytes, archive: bytes, other: bytes) -> tuple[int, list[str]]:
    failures = []
    count = 0
    for case in cases(archive, other):
        count += 1
        problem = check(decompressor, original, case)
        if problem:
            failures.append(problem)
    return count, failures


if __name__ == "__main__":
    import tempfile
    from pathlib import Path

    from llmpipe.models import cache
    from llmpipe.pipeline.compress import Compressor
    from tests.tiny_model import COMMITTED, DATA, build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        import os

        os.environ["LLMPIPE_CACHE"] = tmp
        model = cache.load(str(COMMITTED))
        other = cache.load(str(build_tiny_model(Path(tmp) / "other", train_steps=1, seed=1)))
        original = (DATA / "alice_chapter1.txt").read_bytes()[:150]
        archive = Compressor(model, chunk_size=64, batch=2, threads=1).compress(original)
        other_archive = Compressor(other, chunk_size=64, batch=2, threads=1).compress(original)
        count, failures = run_all(Decompressor(model), original, archive, other_archive)
        print("\n".join(failures))
        print(f"bad-input suite: {count} cases, {count - len(failures)} passed, {len(failures)} failed")
