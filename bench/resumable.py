"""`bench.py resumable`: a long compression in budgeted calls, continued with `--resume`."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.common import CORPUS, ROOT, baseline_bpb, save
from llmpipe.cli.listing import describe
from llmpipe.errors import ArchiveError
from llmpipe.format.container import ContainerReader
from llmpipe.format.fields import MAX_ROWS, MAX_WINDOW

WORK = ROOT / "bench" / "out"  # partial archives of resumable runs (not committed)


def resumable(args: argparse.Namespace) -> None:
    """Compress a long file with the CLI's ``--resume``, at most ``--budget`` seconds per call.

    Each call continues the partial archive of the last one (kept in
    bench/out/), so the 4 MB enwik8 prefix (about an hour on 2 cores) can be
    done over several ``make bench`` runs. The time is summed over the calls;
    the result is recorded once the archive is complete, the progress before.
    """
    source = CORPUS / args.file
    if not source.exists():
        print(f"skip {args.file}: ../shared/corpus not available")
        return
    WORK.mkdir(parents=True, exist_ok=True)
    target = WORK / f"{source.name}.llmp"
    state_path = WORK / f"{args.name}.state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"seconds": 0.0, "calls": 0}
    if not target.exists():
        command = [sys.executable, str(ROOT / "bin" / "llmpipe"), "-z", "--resume", "-q", "-o", str(target)]
        started = time.perf_counter()
        process = subprocess.Popen([*command, str(source)])
        try:
            process.wait(timeout=args.budget)
        except subprocess.TimeoutExpired:
            process.terminate()  # with --resume the CLI keeps TARGET.part for the next call
            process.wait()
        state["seconds"] += time.perf_counter() - started
        state["calls"] += 1
        state_path.write_text(json.dumps(state))
    size = source.stat().st_size
    part = Path(f"{target}.part")
    made = target if target.exists() else part
    result = {"kind": "resumable", "file": args.file, "bytes": size, "model": _model_name(made), "numerics": "exact"}
    result.update(state)
    if target.exists():
        archive = target.read_bytes()
        result.update(
            complete=True,
            archive_bytes=len(archive),
            bpb=8 * len(archive) / size,
            listing=describe(io.BytesIO(archive), target.name),
            baselines=baseline_bpb(source.read_bytes()),
        )
    else:
        result.update(complete=False, done_bytes=_bytes_in_partial(part))
    print(json.dumps({k: v for k, v in result.items() if k != "listing"}), flush=True)
    save(args.name, result)


def _model_name(archive: Path) -> str | None:
    """The model named in an archive's (or partial archive's) header, if it has one yet."""
    try:
        with archive.open("rb") as f:
            return ContainerReader(f, archive.name).read_stream_header(first=True)["model"]["name"]
    except (OSError, ArchiveError, KeyError, TypeError):
        return None


def _bytes_in_partial(part: Path) -> int:
    """Original bytes held by the complete blocks of a partial archive."""
    if not part.exists():
        return 0
    with part.open("rb") as f:
        reader = ContainerReader(f, part.name)
        try:
            reader.read_stream_header(first=True)
            while reader.read_block(MAX_WINDOW, MAX_ROWS) is not None:
                pass
        except ArchiveError:
            pass  # the interrupted end
        return reader.total
