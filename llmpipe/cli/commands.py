"""``llmpipe fetch`` and ``llmpipe models``: the model cache's commands (no archive involved)."""

from __future__ import annotations

import argparse
import functools
import sys

from llmpipe.cli.parser import parse_size
from llmpipe.defaults import DEFAULT_BATCH, DEFAULT_CHUNK_SIZE, DEFAULT_CONTEXT, DEFAULT_OVERLAP, FLOAT_DTYPES
from llmpipe.errors import UsageError


def fetch(argv: list[str]) -> int:
    """``llmpipe fetch [MODEL]``: fill the cache now, for a machine that will later be offline."""
    from llmpipe.models import cache

    parser = argparse.ArgumentParser(prog="llmpipe fetch", description="put a model into llmpipe's cache")
    parser.add_argument("model", nargs="?", default=None, help="default, a Hugging Face id, a directory or a .gguf")
    args = parser.parse_args(argv)
    if args.model in (None, "default", cache.DEFAULT_MODEL):
        cache.fetch_default(log=lambda m: print(m, file=sys.stderr))
    model = cache.load(args.model)
    print(f"{model.directory} (weights sha256 {model.weights_sha256[:16]}..., loads in {model.load_seconds:.2f} s)")
    return 0


def models(argv: list[str]) -> int:
    """``llmpipe models``: list the cache, remove a model, or plan a model's memory without loading it."""
    from llmpipe.codec.context import ContextWindow
    from llmpipe.models import cache
    from llmpipe.pipeline.compress import coding_plan, default_batch
    from llmpipe.pipeline.plan import parameter_count

    parser = argparse.ArgumentParser(prog="llmpipe models", description="the model cache and memory plans")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--plan", metavar="MODEL", help="print the memory MODEL needs (no weights are loaded)")
    action.add_argument("--remove", metavar="NAME", help="delete a cached model")
    parser.add_argument("--numerics", choices=("exact", "float"), default="exact")
    parser.add_argument("--dtype", choices=FLOAT_DTYPES, default="float32")
    parser.add_argument("--load-in-8bit", action="store_true", help="float numerics with int8 weights")
    parser.add_argument(
        "-b", "--batch", type=int, metavar="ROWS", help=f"rows (default {DEFAULT_BATCH}, or fewer to fit -M)"
    )
    parser.add_argument("--context", type=int, default=DEFAULT_CONTEXT, metavar="TOKENS")
    parser.add_argument("--chunk-size", type=parse_size, default=DEFAULT_CHUNK_SIZE, metavar="BYTES")
    parser.add_argument("--mixer", choices=("ngram-match", "none"), default="ngram-match")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default %(default)s)")
    parser.add_argument("-M", "--memory", type=parse_size, metavar="SIZE", help="limit to check against, e.g. 16G")
    args = parser.parse_args(argv)
    if args.remove:
        print(f"removed {cache.remove(args.remove)}")
        return 0
    if args.plan:
        if args.numerics == "exact" and (args.dtype != "float32" or args.load_in_8bit):
            raise UsageError("--dtype and --load-in-8bit plan the float engine (add --numerics float)")
        config = cache.find_config(args.plan)
        try:  # the overlap does not change the memory; any valid one will do
            context = ContextWindow(args.context, max(1, min(DEFAULT_OVERLAP, args.context - 2)) if args.context else 0)
        except ValueError as exc:
            raise UsageError(f"--context {args.context}: {exc}") from None
        plan_of = functools.partial(
            coding_plan,
            config,
            numerics=args.numerics,
            dtype=args.dtype,
            load_in_8bit=args.load_in_8bit,
            device=args.device,
            chunk_size=args.chunk_size,
            context=context,
            mixing=args.mixer != "none",
            limit=args.memory,
        )
        if args.batch is None:  # what compressing would choose
            args.batch = default_batch(plan_of(batch=DEFAULT_BATCH), args.chunk_size)
        plan = plan_of(batch=args.batch)
        weights = f" ({args.dtype}{', 8-bit' if args.load_in_8bit else ''})" if args.numerics == "float" else ""
        positions = min(context.longest_context(args.chunk_size), config.max_position_embeddings)
        print(
            f"{args.plan}: {config.arch}, {parameter_count(config) / 1e6:.0f}M parameters; {args.numerics} numerics"
            f"{weights}, batch {args.batch} x {positions} positions, on {args.device}"
        )
        print("\n".join(plan.render()))
        return 0 if plan.fits() else 1
    models = cache.cached_models()
    if not models:
        print(f"no models in {cache.cache_dir() / 'models'} (`llmpipe fetch` puts the default one there)")
    for model in models:
        size = f"{model.disk_bytes / 2**20:.0f} MiB"
        print(f"{model.name:<36} {model.arch:<9} {size:>9}  sha256 {model.weights_sha256[:16]}  {model.directory}")
    return 0
