"""The steering report: what each ``--steer`` mode and each coding of a learned vector costs and saves.

    python bench/steering.py run --name steering-enwik8-1mb --file enwik/enwik8_first_1000000 \\
        --bytes 1000000 --epochs 20 --text "This is Wikipedia html" --measure none learned
    python bench/steering.py report --write STEERING.md

``run`` learns one virtual token on the slice exactly as ``--steer learn:1``
does (the compressor's own ``steer_on``: training rows, held-out rows,
every coding of ``steering.quantise`` ranked by projected total), projects
the other modes (no prompt, a fixed text, a static random prompt) on the same
held-out rows, and compresses the slice for real with the modes named by
``--measure``, so the projection can be checked against archive sizes.
Results go to ``bench/results/<name>.json``; ``report`` writes every stored
run into STEERING.md (``make steering-report`` runs both). The experiments
are in bench/steering_runs.py, the report in bench/steering_report.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import CORPUS  # noqa: E402
from bench.steering_report import report  # noqa: E402
from bench.steering_runs import STUDY_MODES, auto, curve, hyperpriors, run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run")
    p.add_argument("--name", required=True, help="results name (steering-...)")
    p.add_argument("--file", required=True, help="a corpus file, relative to ../shared/corpus")
    p.add_argument("--bytes", type=int, default=1_000_000)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--tokens", type=int, default=1, help="N of learn:N")
    p.add_argument("--text", default="This is Wikipedia html", help="the fixed string of text:STRING")
    p.add_argument("--random-tokens", type=int, default=8, help="N of the static random:N prompt")
    p.add_argument("--model", help="default: the default model (a tiny test model makes a quick dry run)")
    p.add_argument("--measure", nargs="*", default=["none", "learned"], choices=STUDY_MODES)
    p.set_defaults(func=run)
    p = sub.add_parser("auto")
    p.add_argument("--name", required=True, help="results name (auto-...)")
    p.add_argument("--file", required=True, help="a corpus file, relative to ../shared/corpus")
    p.add_argument("--slices", type=int, nargs="*", default=[], help="offsets of 128 KiB slices to measure")
    p.add_argument("--as-if-long", action="store_true", help="decide as on an input of AUTO_MIN_BYTES or more")
    p.add_argument("--model")
    p.set_defaults(func=auto)
    p = sub.add_parser("curve")
    p.add_argument("--name", required=True, help="results name (curve-...)")
    p.add_argument("--file", required=True, help="a corpus file, relative to ../shared/corpus")
    p.add_argument("--bytes", type=int, default=2 * 1024 * 1024, help="the first window (default: 64 x 32 KiB)")
    p.add_argument("--model")
    p.set_defaults(func=curve)

    p = sub.add_parser("hyperpriors")
    p.add_argument("--name", required=True)
    p.add_argument("--model")
    p.set_defaults(func=hyperpriors)
    p = sub.add_parser("report")
    p.add_argument("--write", help="write the report to this file (default: print it)")
    p.set_defaults(func=report)
    args = parser.parse_args()
    if args.command in ("run", "auto", "curve") and not (CORPUS / args.file).exists():
        raise SystemExit(f"{CORPUS / args.file}: not found (the shared corpus is needed for the report)")
    args.func(args)


if __name__ == "__main__":
    main()
