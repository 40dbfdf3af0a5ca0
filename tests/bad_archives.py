"""Generate damaged and hostile variants of a valid archive, and check each is refused.

    python -m tests.bad_archives   # builds the tiny model, runs every case, prints the counts

Nothing here is a committed binary: every case is derived from an archive made
on the spot. For each case the decoder must raise an :class:`LlmpipeError`
(one clear message), write only a prefix of the original made of verified
blocks, and never raise anything else.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from llmpipe.errors import LlmpipeError
from llmpipe.format.container import FOOTER_SIZE, ContainerReader, index_and_footer_bytes
from llmpipe.format.fields import decode_varint, encode_varint
from llmpipe.format.header import MAGIC, stream_header_bytes
from llmpipe.pipeline.decompress import Decompressor


@dataclass
class Case:
    name: str
    data: bytes


def split_header(archive: bytes) -> tuple[dict, bytes]:
    reader = ContainerReader(io.BytesIO(archive), "archive")
    header = reader.read_stream_header(first=True)
    return header or {}, archive[reader.header_size :]


def with_header(archive: bytes, header: dict) -> bytes:
    """The same one-stream archive with its header replaced (valid CRCs and index: only the contents are wrong)."""
    before_index, _, entries = split_index(archive)
    head = stream_header_bytes(header)
    return head + split_header(before_index)[1] + index_and_footer_bytes(len(head), b"".join(entries))


def split_index(archive: bytes) -> tuple[bytes, int, list[bytes]]:
    """A one-stream version 3 archive as (everything before the index, header size, each block's entry)."""
    (index_size,) = struct.unpack("<I", archive[-FOOTER_SIZE[3] : -FOOTER_SIZE[3] + 4])
    start = len(archive) - FOOTER_SIZE[3] - index_size
    index = archive[start : start + index_size]
    header_size, pos = decode_varint(index, 1, "index")
    entries = []
    while pos < len(index):
        end = decode_varint(index, decode_varint(index, pos, "index")[1], "index")[1]
        entries.append(index[pos:end])
        pos = end
    return archive[:start], header_size, entries


def with_index(archive: bytes, header_size: int, entries: list[bytes]) -> bytes:
    """The same blocks with another (well-formed, correctly checksummed) index."""
    return split_index(archive)[0] + index_and_footer_bytes(header_size, b"".join(entries))


HEADER_CHANGES: list[tuple[str, object]] = [
    ("batch", 0),
    ("batch", 10**9),
    ("numerics.version", 2),
    ("chunk_size", 0),
    ("chunk_size", 2**62),
    ("prime_token", 10**6),
    ("prime_token", 10**9),
    ("model.id", "00" * 16),
    ("model.vocab_size", 7),
    ("context.window", 2**40),
    ("context.window", 1),
    ("context.overlap", 10**6),
    ("mixer.version", 1),  # a valid header, but not the one the blocks were coded with: checksums must catch it
    ("mixer.version", 9),
    ("mixer", None),  # as above
    ("steering", {"mode": "random", "tokens": 2, "seed": 1, "scale": 0.5}),  # as above
    ("steering", {"mode": "text", "text": "x", "tokens": [10**6]}),
]
"""Headers a writer could write (every field in range for its type) that a decoder must still refuse."""


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
    yield Case("reserved stream flags", MAGIC + bytes([archive[6], archive[7] | 0x40]) + archive[8:])
    yield Case("trailing garbage", archive + b"garbage")
    yield Case("trailing partial magic", archive + MAGIC[:3])
    yield Case("another model's archive", other_model_archive)
    yield Case("missing footer", archive[: -FOOTER_SIZE[3]])
    yield Case("missing index and footer", split_index(archive)[0])
    before_index, header_size, entries = split_index(archive)
    yield Case("index lists a block too few", with_index(archive, header_size, entries[:-1]))
    yield Case("index lists a block too many", with_index(archive, header_size, entries + entries[-1:]))
    yield Case("index says another header size", with_index(archive, header_size + 1, entries))
    yield Case("index entry changed", with_index(archive, header_size, entries[:-1] + [entries[-1][:-1] + b"\x05"]))
    blocks = before_index[header_size:]
    huge = bytes([1]) + encode_varint(1 << 40) + blocks[1:]
    yield Case("block size 2^40", archive[:header_size] + huge)
    header, _ = split_header(archive)
    for path, value in HEADER_CHANGES if header.get("model") else []:
        changed = {key: dict(value) if isinstance(value, dict) else value for key, value in header.items()}
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
