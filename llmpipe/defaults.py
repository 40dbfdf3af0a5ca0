"""Default settings, in a module that imports nothing heavy (``llmpipe -l`` must not load torch).

The chunk size, context window and overlap come from the measured grid in
BENCHMARKS.md ("context", slices spread over enwik8's first megabyte): a
2,048-token window restarted from its last 512 tokens codes 16 KB rows 0.9%
smaller than a 1,024/256 window and 1.3% smaller than 8 KB chunks, at a
modelled 92% of 8 KB chunks' decoding speed; 32 KB rows (inputs of 2 MB and
more fill a batch of them) gain 1.0% more at the same speed per row. Longer
windows or overlaps gain 0.2-0.6% more but decode below 75% of 8 KB chunks.
"""

import os
from pathlib import Path

from llmpipe.errors import UsageError

VERSION = "0.6.0"  # llmpipe's release (pyproject.toml's version), written into every stream header

DEFAULT_CHUNK_SIZE = 32768
DEFAULT_BATCH = 64
ALL_THREADS = 0  # ``-T 0``, the default: one thread per CPU this process may use (zstd's convention)
MAX_THREADS = 256
DEFAULT_CONTEXT = 2048  # tokens a prediction sees at most; 0: the whole chunk
DEFAULT_OVERLAP = 512  # tokens kept when the context window restarts
DEFAULT_STEER = "auto"  # learn a prompt only where the projected saving clears its cost (STEERING.md)
DEFAULT_STEER_EPOCHS = 20  # training steps of a learned prompt (STEERING.md: what 20 steps gain)
DEFAULT_STEER_SECONDS = 600.0  # ... and their time limit
FLOAT_DTYPES = ("float32", "float16", "bfloat16")  # --dtype choices of the float engine


def resolve_threads(threads: int) -> int:
    """``threads`` itself, or for :data:`ALL_THREADS` the CPUs this process may run on (its affinity mask,
    which containers and ``taskset`` narrow; ``os.cpu_count()`` where there is none), at most
    :data:`MAX_THREADS`; outside 0 to :data:`MAX_THREADS`, :class:`UsageError`. Exact archives do not depend
    on it; float ones record it."""
    if not 0 <= threads <= MAX_THREADS:
        raise UsageError(f"threads must be between 0 (every CPU) and {MAX_THREADS}")
    if threads != ALL_THREADS:
        return threads
    try:
        available = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        available = os.cpu_count() or 1
    return max(1, min(MAX_THREADS, available))


def cache_dir() -> Path:
    """Root of llmpipe's cache, honouring ``LLMPIPE_CACHE`` and ``XDG_CACHE_HOME``."""
    if os.environ.get("LLMPIPE_CACHE"):
        return Path(os.environ["LLMPIPE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llmpipe"
