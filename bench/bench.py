"""`make bench`: llmpipe against zstd, xz, brotli and bzip2 on the same bytes, in one run.

    python bench/bench.py run  --name main  [--bytes N] [--chunk-size B] [--batch N] [--numerics exact|float] [FILE ...]
    python bench/bench.py numerics --name numerics [--bytes N] [FILE ...]
    python bench/bench.py mixing --name mixing [--bytes N] [FILE ...]
    python bench/bench.py roofline --name roofline
    python bench/bench.py backup --name backup [--bytes N]
    python bench/bench.py resumable --name enwik8-4mb [--file F] [--budget SECONDS]
    python bench/bench.py small-files --name small-files [--before COMMIT [--repeats N] [--before-only]]
    python bench/bench.py scale-out --name scale-out [--bytes N] [--chunk-size B] [--batch N] [--ray]
    python bench/bench.py sweep --name chunks --file enwik/enwik8_first_1000000 --bytes N
    python bench/bench.py report --write BENCHMARKS.md

Each run stores its measurements as JSON under bench/results/, with the
machine and the command; `report` renders every stored run into
BENCHMARKS.md. Files are named relative to ../shared/corpus and sliced to
their first N bytes (said in the table). One module per experiment
(bench/files.py, steps.py, ...), bench/common.py for what they share,
bench/report.py for the report; this file only dispatches.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import throughput  # noqa: E402
from bench.backup import backup  # noqa: E402
from bench.common import CORPUS, RESULTS, save  # noqa: E402
from bench.context import context_grid  # noqa: E402
from bench.files import run, sweep  # noqa: E402
from bench.mixing import compare_mixing  # noqa: E402
from bench.numerics import compare_numerics  # noqa: E402
from bench.report import report  # noqa: E402
from bench.resumable import resumable  # noqa: E402
from bench.roofline import roofline  # noqa: E402
from bench.roundtrip import roundtrip  # noqa: E402
from bench.scale_out import scale_out  # noqa: E402
from bench.small_files import small_files  # noqa: E402
from bench.steps import decoding_steps, step_rows  # noqa: E402
from llmpipe.defaults import DEFAULT_BATCH, DEFAULT_CHUNK_SIZE, DEFAULT_CONTEXT, DEFAULT_OVERLAP  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    names = (
        "run",
        "numerics",
        "mixing",
        "sweep",
        "roundtrip",
        "roofline",
        "backup",
        "context",
        "steps",
        "step-rows",
        "resumable",
        "small-files",
        "scale-out",
    )
    for name in names:
        p = sub.add_parser(name)
        p.add_argument("--name", required=True)
        p.add_argument("--model", default=None)
        p.add_argument("--bytes", type=int, default=131072)
        p.add_argument("--threads", type=int, default=2)
    runner = sub.choices["run"]
    runner.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    runner.add_argument("--batch", type=int, default=DEFAULT_BATCH)
    runner.add_argument("--numerics", choices=("exact", "float"), default="exact")
    runner.add_argument("--context", type=int, default=DEFAULT_CONTEXT, help="context window (0: the whole row)")
    runner.add_argument("--overlap", type=int, default=DEFAULT_OVERLAP)
    runner.add_argument("--compress-only", action="store_true", help="skip the (slower) decompression")
    runner.add_argument("files", nargs="*")
    sub.choices["numerics"].add_argument("files", nargs="*")
    sub.choices["mixing"].add_argument("files", nargs="*")
    sub.choices["resumable"].add_argument("--file", default="enwik/enwik8_first_4000000")
    sub.choices["resumable"].add_argument("--budget", type=float, default=3600, help="seconds for this call")
    sub.choices["roundtrip"].add_argument("--chunk-size", type=int, default=512)
    sub.choices["roundtrip"].add_argument("--batch", type=int, default=DEFAULT_BATCH)
    sub.choices["context"].add_argument("--file", default="enwik/enwik8_first_1000000")
    sub.choices["context"].add_argument("--slices", type=int, default=6, help="slices of --bytes spread over the file")
    sweeper = sub.choices["sweep"]
    sweeper.add_argument("--file", default="enwik/enwik8_first_1000000")
    sweeper.add_argument("--chunk-sizes", type=int, nargs="+", default=[2048, 8192, 16384])
    sub.choices["step-rows"].add_argument("--batches", type=int, nargs="+", default=[64, 128, 256])
    files = sub.choices["small-files"]
    files.add_argument("--before", help="also time the 4 KB slices with llmpipe at this commit")
    files.add_argument("--repeats", type=int, default=3, help="decodes of each slice, then and now, in turns")
    files.add_argument("--before-only", action="store_true", help="only --before, into the stored run")
    scaler = sub.choices["scale-out"]
    scaler.add_argument("--file", default="enwik/enwik8_first_1000000")
    scaler.add_argument("--chunk-size", type=int, default=8192)
    scaler.add_argument("--batch", type=int, default=8)
    scaler.add_argument("--ray", action="store_true", help="also on a Ray cluster started on 127.0.0.1 for the run")
    speeds = sub.add_parser("throughput")
    speeds.add_argument("--name", required=True)
    speeds.add_argument("--model", default=None)
    speeds.add_argument("--bytes", type=int, default=1_000_000)
    speeds.add_argument("--threads", dest="thread_counts", type=int, nargs="+", default=[1, 2])
    speeds.add_argument("--append", action="store_true", help="add to (or replace in) the stored rows")
    speeds.add_argument("files", nargs="*", default=["enwik/enwik8_first_1000000", "calgary/paper2"])
    sub.add_parser("report").add_argument("--write", default=str(ROOT / "BENCHMARKS.md"))
    args = parser.parse_args()
    commands = {
        "run": run,
        "numerics": compare_numerics,
        "mixing": compare_mixing,
        "sweep": sweep,
        "roundtrip": roundtrip,
        "roofline": roofline,
        "backup": backup,
        "context": context_grid,
        "steps": decoding_steps,
        "step-rows": step_rows,
        "resumable": resumable,
        "small-files": small_files,
        "scale-out": scale_out,
        "throughput": lambda a: throughput.run(a, CORPUS, RESULTS, save),
        "report": report,
    }
    commands[args.command](args)


if __name__ == "__main__":
    main()
