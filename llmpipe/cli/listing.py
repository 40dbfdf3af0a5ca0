"""``llmpipe -l``: describe an archive from its headers and index only.

Nothing here imports torch or loads a model, so listing a large archive
takes a few reads and milliseconds.
"""

from __future__ import annotations

import json
from typing import BinaryIO

from llmpipe.format.container import BlockKind
from llmpipe.format.index import StreamIndex, read_archive_index


def describe(source: BinaryIO, name: str, blocks: bool = False) -> dict:
    """A JSON-ready summary of a seekable archive; with ``blocks`` also every block's entry."""
    streams = read_archive_index(source, name)
    described = [_stream(s, blocks) for s in streams]
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


def _stream(stream: StreamIndex, blocks: bool) -> dict:
    header = stream.header
    model = header.get("model") if isinstance(header.get("model"), dict) else {}
    counts = {k.name.lower(): 0 for k in BlockKind if k}
    llm_in = llm_out = tokens = 0
    for b in stream.blocks:
        counts[b.kind.name.lower()] += 1
        if b.kind == BlockKind.LLM:
            llm_in += b.original_size
            llm_out += b.stored_size
            tokens += b.token_count
    info = {
        "offset": stream.start,
        "model": model.get("name"),
        "weights_sha256": model.get("weights_sha256"),
        "numerics": header.get("numerics"),
        "chunk_size": header.get("chunk_size"),
        "batch": header.get("batch"),
        "context": header.get("context"),
        "mixer": header.get("mixer"),
        "steering": header.get("steering"),
        # what the record adds to the header before zstd (an upper bound of its cost)
        "steering_bytes": len(json.dumps(header["steering"])) if header.get("steering") else 0,
        "header_bytes": stream.header_size,
        "index_bytes": stream.index_size,
        "original_bytes": stream.original_size,
        "compressed_bytes": stream.stored_size,
        "blocks": counts,
        "llm_tokens": tokens,
        "llm_bits_per_byte": 8 * llm_out / llm_in if llm_in else None,
        "writer": header.get("llmpipe"),
    }
    if blocks:
        info["block_list"] = [
            {
                "number": b.number,
                "kind": b.kind.name.lower(),
                "offset": b.offset,
                "compressed_bytes": b.stored_size,
                "original_offset": b.original_offset,
                "original_bytes": b.original_size,
                "tokens": b.token_count,
            }
            for b in stream.blocks
        ]
    return info


def format_table(infos: list[dict], verbose: bool = False) -> str:
    """The human-readable listing: one line per file (and per block with ``verbose``), then a total."""
    columns = ("Streams", 7), ("Blocks", 7), ("Compressed", 12), ("Original", 12), ("Ratio", 6), ("Bits/B", 6)
    lines = [" ".join(f"{title:>{width}}" for title, width in columns) + "  Model  File"]
    for info in infos:
        streams = info["streams"]
        blocks = sum(sum(s["blocks"].values()) for s in streams)
        models = ",".join(sorted({str(s["model"]) for s in streams}))
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
        numerics = s["numerics"] or {}
        context = s["context"] if isinstance(s["context"], dict) else {}
        mixer = s["mixer"] if isinstance(s["mixer"], dict) else {}
        lines.append(
            f"  stream {k}: model {s['model']} (weights {str(s['weights_sha256'])[:12]}...), "
            f"numerics {numerics.get('engine')} v{numerics.get('version', '-')}, chunk {s['chunk_size']}, "
            f"batch {s['batch']}, context {context.get('window')}/{context.get('overlap')}, "
            f"mixer {mixer.get('name', 'none')}, steering {_steering(s['steering'])} ({s['steering_bytes']} bytes), "
            f"header {s['header_bytes']} + index {s['index_bytes']} bytes"
        )
        for b in s.get("block_list", []):
            lines.append(
                f"    block {b['number']:>6} {b['kind']:>4} {b['compressed_bytes']:>9} <- {b['original_bytes']:>9} "
                f"bytes at {b['original_offset']}"
            )
    return lines
