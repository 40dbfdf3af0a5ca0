"""``--resume`` of an interrupted compression: what of a partial archive can be kept.

A partial archive holds its stream header and the blocks written before the
interruption, the last of them perhaps cut short. Whole blocks are kept
(each is one window, its rows a lockstep group), each checked against the
input's bytes at its place; the rest is cut off and coding continues from
the first byte not yet coded.
"""

from __future__ import annotations

from typing import BinaryIO

from llmpipe.errors import ArchiveError, UsageError
from llmpipe.format.container import ContainerReader, StreamWriter
from llmpipe.format.fields import crc32


def keep_complete_blocks(
    partial: BinaryIO, name: str, reader: ContainerReader, source: BinaryIO, batch: int, max_block: int
) -> StreamWriter:
    """After ``reader`` read ``partial``'s stream header: keep every complete block that matches ``source``.

    Every kept block's checksum is compared with the input's bytes at its
    place (the input must be the same seekable file); ``partial`` is cut
    after the last complete block and ``source`` positioned at the first byte
    not yet coded. Returns the writer that continues the stream.
    """
    while True:
        kept = StreamWriter.continuing(partial, reader)
        try:
            block = reader.read_block(max_block, batch)
        except ArchiveError:
            break  # the interrupted write: everything before it is kept
        if block is None:
            break
        start = reader.total - block.original_size
        source.seek(start)
        if crc32(source.read(block.original_size)) != block.checksum:
            raise UsageError(f"{name}: the input differs from what it holds at byte {start}; cannot resume it")
    partial.seek(kept.size)
    partial.truncate()
    source.seek(kept.total_size)
    return kept
