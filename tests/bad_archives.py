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

from llmpipe.decompressor import Decompressor
from llmpipe.errors import LlmpipeError
from llmpipe.format.container import MAGIC


@dataclass
class Case:
    name: str
    data: bytes


def split_header(archive: bytes) -> tuple[dict, bytes]:
    size = struct.unpack("<I", archive[8:12])[0]
    header = json.loads(zstandard.ZstdDecompressor().decompress(archive[16 : 16 + size]))
    return header, archive[16 + size :]


def with_header(archive: bytes, header: dict) -> bytes:
    """The same archive with its header replaced (a valid CRC, so only the contents are wrong)."""
    _, rest = split_header(archive)
    body = zstandard.ZstdCompressor().compress(json.dumps(header).encode())
    return archive[:8] + struct.pack("<II", len(body), zlib.crc32(body)) + body + rest


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
    ]:
        changed = json.loads(json.dumps(header))
        target = changed
        *parents, leaf = path.split(".")
        for key in parents:
            target = target[key]
        target[leaf] = value
        yield Case(f"header {path}={value!r}", with_header(archive, changed))


def check(decompressor: Decompressor, original: bytes, case: Case) -> str | None:
    """None if the decoder behaved, else what went wrong."""
    sink = io.BytesIO()
    try:
        decompressor.decompress_stream(io.BytesIO(case.data), sink)
    except LlmpipeError as exc:
        message = str(exc)
        if not message or "\n" in message:
            return f"{case.name}: message is not one line: {message!r}"
        if not original.startswith(sink.getvalue()):
            return f"{case.name}: wrote bytes that are not a prefix of the original"
        return None
    except Exception as exc:  # noqa: BLE001 - any other exception is the bug being looked for
        return f"{case.name}: {type(exc).__name__}: {exc}"
    if sink.getvalue() != original:
        return f"{case.name}: decoded without error to different bytes"
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

    from llmpipe.compressor import Compressor
    from llmpipe.models import cache
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
