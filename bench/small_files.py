"""`bench.py small-files`: small inputs against xz, zstd and brotli; what the framing, the cut into rows and a
row's first tokens cost; how long a small file takes to decode, and to start.

Slices are each file's first N bytes. Decode seconds are the decoder's alone, the model loaded (a fresh
command adds the start-up measured in its own table); ``--before COMMIT`` times the same 4 KB slices with
an earlier llmpipe, checked out into a temporary git worktree, for the "today" of issue 22, in turns with
this one (``--repeats``); ``--before-only`` runs that part alone into the stored run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import brotli

from bench.common import CORPUS, RESULTS, ROOT, archive_layout, corpus_slices, save
from llmpipe.models import cache
from llmpipe.pipeline.blocks import TWO_ROWS_FROM
from llmpipe.pipeline.compress import Compressor
from llmpipe.pipeline.decompress import Decompressor

SIZES = (256, 1024, 4096, 16384)
TEXTS = ["enwik/enwik8_first_1000000", "calgary/paper2", "calgary/news"]
ENGLISH = [
    "enwik/enwik8_first_1000000",
    "enwik/text8_first_1563505",
    "canterbury/alice29.txt",
    "canterbury/asyoulik.txt",
    "canterbury/lcet10.txt",
    "canterbury/plrabn12.txt",
    "canterbury_large/bible.txt",
    "canterbury_large/world192.txt",
    "calgary/book1",
    "calgary/book2",
    "calgary/news",
    "calgary/paper1",
    "calgary/paper2",
    "calgary/paper3",
    "calgary/paper4",
    "calgary/paper5",
    "calgary/paper6",
]
"""Every English text of the corpus (its other files are code, markup, tables or binary)."""
ROWS = {4096: (1, 2, 4), 16384: (1, 2, 4, 8)}
STARTS = {"default": {}, "--mixer none": {"mixing": False}, "--steer text:\\n": {"steer": "text:\n"}}
STARTS["--steer text:<|im_start|>"] = {"steer": "text:<|im_start|>"}


def baselines(data: bytes) -> dict[str, int]:
    """Archive bytes of the small-file baselines of issue 22, at their strongest settings."""
    sizes = {}
    for name, command in {"xz -9e": ["xz", "-9e", "-c"], "zstd -19": ["zstd", "-19", "-c", "-q"]}.items():
        sizes[name] = len(subprocess.run(command, input=data, capture_output=True, check=True).stdout)
    sizes["brotli -q 11"] = len(brotli.compress(data, quality=11))
    return sizes


def _timed(function, *arguments, **options):
    started = time.perf_counter()
    value = function(*arguments, **options)
    return value, time.perf_counter() - started


def small_files(args: argparse.Namespace) -> None:
    if args.before_only:
        before_only(args)
        return
    model = cache.load(args.model)
    compressor = Compressor(model, threads=args.threads)
    decompressor = Decompressor(model, threads=args.threads)
    result: dict = {"kind": "small-files", "model": model.name, "numerics": "exact"}

    def coded(data: bytes, coder: Compressor = compressor, decode: bool = True) -> dict:
        archive, compress_s = _timed(coder.compress, data)
        framing, rows = archive_layout(archive)
        row = {"archive_bytes": len(archive), "framing_bytes": framing, "rows": rows, "compress_s": compress_s}
        if decode:
            restored, row["decompress_s"] = _timed(decompressor.decompress, archive)
            if restored != data:
                raise SystemExit("round trip FAILED")
        return row

    result["sizes"] = []
    for size in SIZES:
        for relative, data in corpus_slices(TEXTS, size):
            row = {"file": relative, "bytes": len(data), **coded(data), "baselines": baselines(data)}
            print(json.dumps(row), flush=True)
            result["sizes"].append(row)
    save(args.name, result)  # each part as it is done: the whole run takes half an hour
    result["english"] = []
    for size in (1024, 4096):
        for relative, data in corpus_slices(ENGLISH, size):
            row = {"file": relative, "bytes": len(data), **coded(data, decode=False), "baselines": baselines(data)}
            print(json.dumps(row), flush=True)
            result["english"].append(row)
    save(args.name, result)
    result["rows"] = []
    for size, counts in ROWS.items():
        for relative, data in corpus_slices(TEXTS, size):
            row: dict = {"file": relative, "bytes": len(data)}
            windows = compressor.windows
            windows.two_rows_from = len(data) + 1  # exactly `count` rows, whatever the rule would choose
            for count in counts:
                windows.rows_for = lambda _size, count=count: count
                row[str(count)] = coded(data)
            del windows.rows_for  # the rule again
            windows.two_rows_from = TWO_ROWS_FROM
            print(json.dumps(row), flush=True)
            result["rows"].append(row)
    save(args.name, result)
    result["starts"] = []
    coders = {label: Compressor(model, threads=args.threads, **options) for label, options in STARTS.items()}
    for size in (1024, 4096):
        for relative, data in corpus_slices(TEXTS, size):
            row = {"file": relative, "bytes": len(data)}
            row.update({label: len(coder.compress(data)) for label, coder in coders.items()})
            print(json.dumps(row), flush=True)
            result["starts"].append(row)
    save(args.name, result)
    result["startup"] = startup(args)
    save(args.name, result)
    result["many"] = many_files(args)
    save(args.name, result)
    if args.before:
        result["before"] = before(args.before, args.threads, args.repeats)
    save(args.name, result)


def startup(args: argparse.Namespace) -> dict:
    """Wall seconds of fresh commands on the 1 KB enwik8 slice (best of three): the imports alone, then
    compressing and decompressing it with the launcher."""
    path = CORPUS / TEXTS[0]
    if not path.exists():
        return {}
    data = path.read_bytes()[:1024]
    launcher = [sys.executable, str(ROOT / "bin" / "llmpipe"), "-T", str(args.threads)]
    archive = subprocess.run([*launcher, "-c"], input=data, capture_output=True, check=True).stdout
    commands = {
        "imports (python, torch, llmpipe)": ([sys.executable, "-c", "import torch, llmpipe.cli.main"], b""),
        "llmpipe -c (1 KB)": ([*launcher, "-c"], data),
        "llmpipe -d -c (1 KB)": ([*launcher, "-d", "-c"], archive),
    }
    seconds = {}
    for label, (command, given) in commands.items():
        runs = [_timed(subprocess.run, command, input=given, capture_output=True, check=True)[1] for _ in range(3)]
        seconds[label] = min(runs)
    return seconds


MANY_FILES, MANY_DECODED, MANY_BYTES = 100, 20, 2048


def many_files(args: argparse.Namespace) -> dict:
    """One command on MANY_FILES files of 2 KB (consecutive pieces of calgary/book2), then one command decoding
    MANY_DECODED of the archives: the model loads once a command (wall seconds, archive bytes)."""
    path = CORPUS / "calgary/book2"
    if not path.exists():
        return {}
    text = path.read_bytes()
    launcher = [sys.executable, str(ROOT / "bin" / "llmpipe"), "-q", "-T", str(args.threads)]
    with tempfile.TemporaryDirectory() as folder:
        names = []
        for k in range(MANY_FILES):
            name = Path(folder) / f"piece{k:03}.txt"
            name.write_bytes(text[k * MANY_BYTES : (k + 1) * MANY_BYTES])
            names.append(str(name))
        _, compress_s = _timed(subprocess.run, [*launcher, *names], check=True)
        archives = [f"{n}.llmp" for n in names]
        packed = sum(Path(a).stat().st_size for a in archives)
        for name in names[:MANY_DECODED]:
            Path(name).unlink()
        _, decompress_s = _timed(subprocess.run, [*launcher, "-d", *archives[:MANY_DECODED]], check=True)
        restored = all(
            Path(n).read_bytes() == text[k * MANY_BYTES : (k + 1) * MANY_BYTES]
            for k, n in enumerate(names[:MANY_DECODED])
        )
    if not restored:
        raise SystemExit("round trip FAILED")
    return {
        "files": MANY_FILES,
        "bytes_each": MANY_BYTES,
        "archive_bytes": packed,
        "compress_s": compress_s,
        "decoded_files": MANY_DECODED,
        "decompress_s": decompress_s,
    }


BEFORE_SCRIPT = """
import json, sys, time
from pathlib import Path
from llmpipe.models import cache
from llmpipe.pipeline.compress import Compressor
from llmpipe.pipeline.decompress import Decompressor
model = cache.load(None)
compressor, decompressor = Compressor(model, threads=int(sys.argv[1])), Decompressor(model, threads=int(sys.argv[1]))
for path in sys.argv[2:]:
    data = Path(path).read_bytes()[:4096]
    archive = compressor.compress(data)
    started = time.perf_counter()
    assert decompressor.decompress(archive) == data
    print(json.dumps({"archive_bytes": len(archive), "decompress_s": time.perf_counter() - started}))
"""


def before(commit: str, threads: int, repeats: int) -> dict:
    """The 4 KB slices of TEXTS decoded by llmpipe at ``commit`` (a temporary worktree, its own archives) and
    by this llmpipe, in turns, ``repeats`` times each: the fastest of each, since this machine's speed drifts
    by 20% within minutes and both should see the same drift."""
    model = cache.load(None)
    compressor, decompressor = Compressor(model, threads=threads), Decompressor(model, threads=threads)
    slices = list(corpus_slices(TEXTS, 4096))
    archives = {relative: compressor.compress(data) for relative, data in slices}
    then: dict[str, list[dict]] = {relative: [] for relative, _ in slices}
    now: dict[str, list[float]] = {relative: [] for relative, _ in slices}
    with tempfile.TemporaryDirectory() as folder:
        tree = Path(folder) / "llmpipe"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(tree), commit], check=True)
        command = [sys.executable, "-c", BEFORE_SCRIPT, str(threads), *(str(CORPUS / t) for t in then)]
        environment = {**os.environ, "PYTHONPATH": str(tree)}
        try:
            for _ in range(repeats):
                done = subprocess.run(command, cwd=tree, env=environment, capture_output=True, check=True)
                for relative, line in zip(then, done.stdout.decode().splitlines(), strict=True):
                    then[relative].append(json.loads(line))
                for relative, data in slices:
                    restored, seconds = _timed(decompressor.decompress, archives[relative])
                    if restored != data:
                        raise SystemExit("round trip FAILED")
                    now[relative].append(seconds)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=True)
    rows = [
        {
            "file": relative,
            "archive_bytes": runs[0]["archive_bytes"],
            "decompress_s": min(run["decompress_s"] for run in runs),
            "now_archive_bytes": len(archives[relative]),
            "now_decompress_s": min(now[relative]),
        }
        for relative, runs in then.items()
    ]
    command = shlex.join(["python", "bench/bench.py", *sys.argv[1:]])
    return {"commit": commit, "repeats": repeats, "command": command, "date": time.strftime("%Y-%m-%d"), "rows": rows}


def before_only(args: argparse.Namespace) -> None:
    """``--before-only``: the comparison with an earlier commit run again, into the stored run (written
    as it is, not through ``save``, which would give the whole run this command and date)."""
    path = RESULTS / f"{args.name}.json"
    result = json.loads(path.read_text())
    result["before"] = before(args.before, args.threads, args.repeats)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


def section(run: dict, table_head) -> list[str]:
    """The ``small-files`` run as BENCHMARKS.md shows it."""
    names = ["xz -9e", "zstd -19", "brotli -q 11"]
    lines = [
        "Each file's first N bytes at the defaults. *framing*: what the archive spends besides its rows' coded",
        "bytes (stream header, block header, index, footer). Decode seconds: the decoder's own, the model",
        "loaded; a fresh command adds the start-up below.",
    ]
    if run.get("note"):
        lines.append(run["note"])
    lines += table_head(
        "| file | bytes | rows | llmpipe bytes | framing | " + " | ".join(names) + " | compress s | decompress s |"
    )
    for r in run["sizes"]:
        base = " | ".join(str(r["baselines"][n]) for n in names)
        lines.append(
            f"| {r['file']} | {r['bytes']} | {r['rows']} | **{r['archive_bytes']}** | {r['framing_bytes']} | {base} | "
            f"{r['compress_s']:.1f} | {r['decompress_s']:.1f} |"
        )
    english = run["english"]
    beaten = [r for r in english if r["archive_bytes"] < min(r["baselines"]["xz -9e"], r["baselines"]["zstd -19"])]
    lines += [
        "",
        f"Every English text of the corpus at 1 KB and 4 KB: llmpipe is smaller than both `xz -9e` and "
        f"`zstd -19` on {len(beaten)} of {len(english)} slices.",
    ]
    lines += table_head("| file | bytes | llmpipe bytes | framing | " + " | ".join(names) + " |")
    for r in english:
        base = " | ".join(str(r["baselines"][n]) for n in names)
        lines.append(f"| {r['file']} | {r['bytes']} | **{r['archive_bytes']}** | {r['framing_bytes']} | {base} |")
    counts = sorted({int(k) for r in run["rows"] for k in r if k.isdigit()})
    lines += [
        "",
        "Cut into exactly 1, 2, 4 or 8 rows (decoded in lockstep, one symbol of each row a step): "
        "archive bytes and decode seconds.",
    ]
    lines += table_head("| file | bytes | " + " | ".join(f"{c} row{'s' * (c > 1)}" for c in counts) + " |")
    for r in run["rows"]:
        cells = [
            f"{r[str(c)]['archive_bytes']} B, {r[str(c)]['decompress_s']:.1f} s" if str(c) in r else "-" for c in counts
        ]
        lines.append(f"| {r['file']} | {r['bytes']} | " + " | ".join(cells) + " |")
    for size in sorted({r["bytes"] for r in run["rows"]}):
        group = [r for r in run["rows"] if r["bytes"] == size]
        one = [r["1"] for r in group]
        parts = []
        for c in counts:
            if all(str(c) in r for r in group) and c > 1:
                more = [r[str(c)] for r in group]
                grown = sum(m["archive_bytes"] for m in more) / sum(o["archive_bytes"] for o in one) - 1
                faster = sum(m["decompress_s"] for m in more) / sum(o["decompress_s"] for o in one)
                parts.append(f"{c} rows {100 * grown:+.1f}% bytes in {faster:.2f} of the time")
        lines.append(f"\n{size} bytes, against one row: " + "; ".join(parts) + ".")
    labels = list(STARTS)
    lines += [
        "",
        "A row's first tokens: archive bytes with the prime token alone (default), without the mixer, "
        "and with a text prompt before every row (paid for in the header).",
    ]
    cells = [f"`{k}`".replace("|", "\\|") if k != "default" else k for k in labels]  # a pipe would end the cell
    lines += table_head("| file | bytes | " + " | ".join(cells) + " |")
    for r in run["starts"]:
        lines.append(f"| {r['file']} | {r['bytes']} | " + " | ".join(str(r[k]) for k in labels) + " |")
    if run.get("startup"):
        lines += ["", "Start-up of a fresh command (wall seconds, best of three):"]
        lines += table_head("| command | seconds |")
        lines += [f"| {k} | {v:.2f} |" for k, v in run["startup"].items()]
    many = run.get("many")
    if many:
        bits = 8 * many["archive_bytes"] / (many["files"] * many["bytes_each"])
        lines += [
            "",
            f"Many files in one command: {many['files']} files of {many['bytes_each']} bytes (consecutive pieces of "
            f"calgary/book2) compressed by one `llmpipe FILE...` in {many['compress_s']:.0f} s "
            f"({many['compress_s'] / many['files']:.2f} s a file, the model loaded once), "
            f"{many['archive_bytes']} bytes in all ({bits:.3f} bits per byte); {many['decoded_files']} of them "
            "decompressed by one `llmpipe -d FILE...` in "
            f"{many['decompress_s']:.0f} s ({many['decompress_s'] / many['decoded_files']:.1f} s a file).",
        ]
    if run.get("before"):
        earlier = run["before"]
        rows = {r["file"]: r["rows"] for r in run["sizes"] if r["bytes"] == 4096}
        lines += [
            "",
            f"4 KB slices against llmpipe at commit {earlier['commit']} (one row, format version 2), decoded in "
            f"turns, the fastest of {earlier['repeats']} each (`{earlier['command']}`, {earlier['date']}):",
        ]
        lines += table_head("| file | then bytes | then decode s | now bytes | now rows | now decode s | time |")
        for r in earlier["rows"]:
            lines.append(
                f"| {r['file']} | {r['archive_bytes']} | {r['decompress_s']:.1f} | {r['now_archive_bytes']} | "
                f"{rows.get(r['file'], '-')} | {r['now_decompress_s']:.1f} | "
                f"{r['now_decompress_s'] / r['decompress_s']:.2f} |"
            )
    return lines
