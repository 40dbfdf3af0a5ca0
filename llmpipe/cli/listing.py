"""``llmpipe -l``: describe an archive from its headers and index only.

Nothing here imports torch or loads a model, so listing a large archive
takes a few reads and milliseconds.
"""

from __future__ import annotations

import json
from typing import BinaryIO

from llmpipe.format.block import RowKind
from llmpipe.format.container import RowEntry
from llmpipe.format.header import stream_header_bytes
from llmpipe.format.index import StreamIndex, block_rows, read_archive_index


def describe(source: BinaryIO, name: str, blocks: bool = False) -> dict:
    """A JSON-ready summary of a seekable archive; with ``blocks`` also every block's entry."""
    streams = read_archive_index(source, name)
    described = [_stream(s, block_rows(source, name, s), blocks) for s in streams]
    original = sum(s.original_size for s in streams)
    stored = sum(s.stored_size for s in streams)
    return {
        "file": name,
        "streams": described,
        "original_bytes": original,
        "compressed_bytes": stored,
        "ratio": stored / original if original else 0.0,
        "bits_per_byte": 8 * stored / original if original else 0.0,
    }


def _stream(stream: StreamIndex, rows: list[list[RowEntry]], blocks: bool) -> dict:
    header = stream.header
    model = header.get("model") if isinstance(header.get("model"), dict) else {}
    counts = {k.name.lower(): 0 for k in RowKind}
    llm_in = llm_out = tokens = 0
    for entry, block in zip(stream.blocks, rows, strict=True):
        for row in block:
            counts[row.kind.name.lower()] += 1
            tokens += row.token_count
        if all(row.kind == RowKind.LLM for row in block):  # LLM bits per byte over the blocks that are all LLM
            llm_in += entry.original_size
            llm_out += sum(row.payload_size for row in block)
    steering = header.get("steering")
    info = {
        "offset": stream.start,
        "format_version": stream.version,
        "model": model.get("name"),
        "model_id": model.get("id") or model.get("weights_sha256"),
        "numerics": header.get("numerics"),
        "chunk_size": header.get("chunk_size"),
        "batch": header.get("batch"),
        "context": header.get("context"),
        "mixer": header.get("mixer"),
        "steering": steering,
        "steering_bytes": _steering_bytes(header, stream.version),
        "header_bytes": stream.header_size,
        "index_bytes": stream.index_size,
        "original_bytes": stream.original_size,
        "compressed_bytes": stream.stored_size,
        "blocks": len(stream.blocks),
        "rows": counts,
        "llm_tokens": tokens,
        "llm_bits_per_byte": 8 * llm_out / llm_in if llm_in else None,
        "writer": header.get("llmpipe"),
    }
    if blocks:
        info["block_list"] = [
            {
                "number": entry.number,
                "rows": " ".join(f"{row.kind.name.lower()}" for row in block),
                "offset": entry.offset,
                "compressed_bytes": entry.stored_size,
                "original_offset": entry.original_offset,
                "original_bytes": entry.original_size,
                "tokens": sum(row.token_count for row in block),
            }
            for entry, block in zip(stream.blocks, rows, strict=True)
        ]
    return info


def format_table(infos: list[dict], verbose: bool = False) -> str:
    """The human-readable listing: one line per file (and per block with ``verbose``), then a total."""
    columns = ("Streams", 7), ("Blocks", 7), ("Compressed", 12), ("Original", 12), ("Ratio", 6), ("Bits/B", 6)
    lines = [" ".join(f"{title:>{width}}" for title, width in columns) + "  Model  File"]
    for info in infos:
        streams = info["streams"]
        blocks = sum(s["blocks"] for s in streams)
        models = ",".join(sorted({s["model"] or "-" for s in streams}))
        lines.append(
            f"{len(streams):>7} {blocks:>7} {info['compressed_bytes']:>12} {info['original_bytes']:>12} "
            f"{info['ratio']:>6.3f} {info['bits_per_byte']:>6.3f}  {models}  {info['file']}"
        )
        if verbose:
            lines += _details(streams)
    if len(infos) > 1:
        packed = sum(i["compressed_bytes"] for i in infos)
        original = sum(i["original_bytes"] for i in infos)
        ratio = packed / original if original else 0.0
        lines.append(f"{'':>7} {'':>7} {packed:>12} {original:>12} {ratio:>6.3f} {8 * ratio:>6.3f}  total")
    return "\n".join(lines)


def _steering(record) -> str:
    """A header's steering record in a few words."""
    if not isinstance(record, dict):
        return "none"
    if record.get("mode") == "text":
        return f"text {str(record.get('text'))[:40]!r} ({len(record.get('tokens') or [])} tokens)"
    if record.get("mode") == "learned":
        quantiser = record.get("quantiser", "uniform")
        if quantiser == "lloyd":
            quantiser = f"Lloyd-Max {len(record.get('levels') or [])} levels"
        else:
            quantiser = f"uniform step {record.get('step')}"
        return f"learned ({record.get('tokens')} virtual tokens, {quantiser}, {record.get('prior')} prior)"
    return f"{record.get('mode')} ({record.get('tokens')} virtual tokens, seed {record.get('seed')})"


def _details(streams: list[dict]) -> list[str]:
    lines = []
    for k, s in enumerate(streams, 1):
        if s["model"] is None:  # a stream whose rows are all zstd or raw
            lines.append(
                f"  stream {k} (format {s['format_version']}): no model (zstd and raw rows only), "
                f"header {s['header_bytes']} + index {s['index_bytes']} bytes"
            )
        else:
            lines.append(_stream_line(k, s))
        for b in s.get("block_list", []):
            lines.append(
                f"    block {b['number']:>6} {b['compressed_bytes']:>9} <- {b['original_bytes']:>9} bytes at "
                f"{b['original_offset']}, {b['tokens']} tokens, rows: {_row_kinds(b['rows'])}"
            )
    return lines


def _stream_line(k: int, s: dict) -> str:
    """A stream's settings in one line."""
    numerics = s["numerics"] or {}
    context = s["context"] if isinstance(s["context"], dict) else {}
    mixer = s["mixer"] if isinstance(s["mixer"], dict) else {}
    return (
        f"  stream {k} (format {s['format_version']}): model {s['model']} (id {str(s['model_id'])[:12]}...), "
        f"numerics {numerics.get('engine')} v{numerics.get('version', '-')}, chunk {s['chunk_size']}, "
        f"batch {s['batch']}, context {context.get('window')}/{context.get('overlap')}, "
        f"mixer {mixer.get('name', 'none')}, steering {_steering(s['steering'])} ({s['steering_bytes']} bytes), "
        f"header {s['header_bytes']} + index {s['index_bytes']} bytes"
    )


def _steering_bytes(header: dict, version: int) -> int:
    """What the steering record adds to the header (version 2: its JSON before zstd, an upper bound)."""
    if not header.get("steering"):
        return 0
    if version == 2:
        return len(json.dumps(header["steering"]))
    return len(stream_header_bytes(header)) - len(stream_header_bytes({**header, "steering": None}))


def _row_kinds(rows: str) -> str:
    """``llm llm zstd llm`` as ``3 llm, 1 zstd``."""
    kinds = rows.split()
    return ", ".join(f"{kinds.count(k)} {k}" for k in dict.fromkeys(kinds))
