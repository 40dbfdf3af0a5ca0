"""The ``llmpipe`` command line: its options, and the sizes and ranges they accept."""

from __future__ import annotations

import argparse

from llmpipe.defaults import (
    ALL_THREADS,
    DEFAULT_BATCH,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_CONTEXT,
    DEFAULT_OVERLAP,
    DEFAULT_STEER,
    DEFAULT_STEER_EPOCHS,
    DEFAULT_STEER_SECONDS,
    FLOAT_DTYPES,
    VERSION,
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llmpipe",
        description="Lossless compression with a language model driving a range coder.",
        epilog="Commands: `llmpipe fetch [MODEL]` puts a model into the cache; `llmpipe models [--plan MODEL | "
        "--remove NAME]` lists the cache, removes a model, or plans a model's memory without loading it.",
    )
    p.add_argument("files", nargs="*", metavar="FILE", help="files to process (none or '-': stdin to stdout)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("-z", "--compress", action="store_true", help="compress (the default)")
    mode.add_argument("-d", "--decompress", action="store_true", help="decompress")
    mode.add_argument("-t", "--test", action="store_true", help="decode and verify archives, write nothing")
    mode.add_argument("-l", "--list", action="store_true", help="describe archives from their index (no model)")
    p.add_argument("-c", "--stdout", action="store_true", help="write to standard output")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE (one input only)")
    p.add_argument("-k", "--keep", action="store_true", help="keep input files (the default)")
    p.add_argument("--rm", action="store_true", help="remove each input file after its output is verified and synced")
    p.add_argument(
        "-f", "--force", action="store_true", help="overwrite outputs; allow terminals; accept numeric mismatches"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print no warnings or progress")
    p.add_argument("-v", "--verbose", action="store_true", help="print statistics (with -l: every block)")
    p.add_argument("-V", "--version", action="version", version=f"llmpipe {VERSION}")
    p.add_argument("--json", action="store_true", help="with -l: print JSON")
    p.add_argument(
        "--range", metavar="START:END", type=parse_byte_range, help="decompress only these bytes of the original"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep TARGET.part if interrupted, and continue an interrupted run from it (input files only)",
    )
    p.add_argument(
        "--keep-going", action="store_true", help="decompress past damaged blocks, leaving them out (exit 1)"
    )
    progress = p.add_mutually_exclusive_group()
    progress.add_argument("--progress", dest="progress", action="store_true", default=None, help="show progress")
    progress.add_argument("--no-progress", dest="progress", action="store_false", help="never show progress")
    p.add_argument("--model", metavar="NAME", help="default, a Hugging Face id, a model directory or a .gguf file")
    p.add_argument(
        "--chunk-size",
        type=parse_size,
        default=DEFAULT_CHUNK_SIZE,
        metavar="BYTES",
        help="bytes per chunk (default %(default)s; accepts K/M)",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        metavar="N",
        help=f"chunks coded together; also rows decoded together (default {DEFAULT_BATCH}, "
        "or fewer when the memory plan says so)",
    )
    p.add_argument(
        "-M",
        "--memory",
        type=parse_size,
        metavar="SIZE",
        help="memory the run may use, e.g. 16G (default: what the device has available); "
        "checked against the memory plan before any weights are read",
    )
    p.add_argument(
        "--context",
        type=int,
        default=DEFAULT_CONTEXT,
        metavar="TOKENS",
        help="longest context a prediction sees; past it the window restarts from its last --overlap tokens "
        "(default %(default)s: the whole chunk)",
    )
    p.add_argument(
        "--overlap",
        type=int,
        default=DEFAULT_OVERLAP,
        metavar="TOKENS",
        help="tokens kept when the context window restarts (default %(default)s)",
    )
    p.add_argument(
        "-T",
        "--threads",
        type=int,
        default=ALL_THREADS,
        metavar="N",
        help="compute threads; 0 (the default): one per CPU this process may use (recorded in float archives; "
        "exact ones do not depend on it)",
    )
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="code windows (or decode groups) on N worker processes, each with its share of the threads; "
        "the archive is the same as one process writes (exact numerics only)",
    )
    p.add_argument(
        "--ray",
        nargs="?",
        const="auto",
        metavar="ADDRESS",
        help="run the workers as actors on a running Ray cluster (ADDRESS host:port, default auto: the local "
        "one); --workers N actors of -T threads each (default: one per CPU of the cluster, or per GPU with "
        "--device cuda); needs pip install 'llmpipe[ray]'",
    )
    p.add_argument(
        "--device",
        default="cpu",
        metavar="DEV",
        help="where the model runs: cpu or cuda[:N]; exact archives decode the same on either (default %(default)s)",
    )
    p.add_argument(
        "--numerics",
        choices=("exact", "float"),
        default="exact",
        help="exact: integer arithmetic, decodes on any machine (default); "
        "float: float32/16 (see --dtype), decodes only where the machine and settings match",
    )
    p.add_argument(
        "--dtype",
        choices=FLOAT_DTYPES,
        default="float32",
        help="with --numerics float: the weights' and activations' dtype (default %(default)s)",
    )
    p.add_argument(
        "--load-in-8bit",
        action="store_true",
        help="with --numerics float: int8 weights through bitsandbytes (LLM.int8), half of float16's memory",
    )
    p.add_argument(
        "--steer",
        default=DEFAULT_STEER,
        metavar="MODE",
        help="a prompt before every chunk, stored in the header: none, text:STRING, random:N[:SEED], learn:N (N "
        "virtual tokens trained on the input's first window, coded the way that gives the smallest total), auto "
        "(default: on inputs of 32 MiB or more, learn one token on the first window and keep it only when its "
        "projected saving clearly exceeds its cost; on smaller ones, none; see STEERING.md)",
    )
    p.add_argument(
        "--steer-epochs",
        type=int,
        default=DEFAULT_STEER_EPOCHS,
        metavar="N",
        help="training steps of a learned prompt (%(default)s)",
    )
    p.add_argument(
        "--steer-seconds",
        type=float,
        default=DEFAULT_STEER_SECONDS,
        metavar="S",
        help="time limit of a learned prompt's training (%(default)g)",
    )
    p.add_argument(
        "--mixer",
        choices=("ngram-match", "none"),
        default="ngram-match",
        help="mix the model with n-gram and match models of each chunk's own history (default %(default)s)",
    )
    return p


def parse_size(text: str) -> int:
    """Bytes: ``4096``, ``8K``, ``16M``, ``16GB``, ``1.5GiB`` (binary units)."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    number = text.lower().removesuffix("ib").removesuffix("b")
    try:
        if number[-1:] in units:
            return int(float(number[:-1]) * units[number[-1]])
        return int(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None


def parse_byte_range(text: str) -> tuple[int, int | None]:
    """``START:END`` (END exclusive; either may be empty, sizes accept K/M)."""
    start, sep, end = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"not a range (START:END): {text!r}")
    lo = parse_size(start) if start else 0
    hi = parse_size(end) if end else None
    if lo < 0 or hi is not None and hi < lo:
        raise argparse.ArgumentTypeError(f"empty or reversed range: {text!r}")
    return lo, hi
