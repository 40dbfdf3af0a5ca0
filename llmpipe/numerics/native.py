"""Compiled kernels: C sources built once per machine, loaded through ctypes, always optional.

The engine (``engine.kernels``: the network's products, attention and
elementwise passes) and the codec (``codec.kernels``: frequency tables,
mixing, adaptive bias) each own their C sources and the typed calls into
them; this module is what they share: building a library from sources,
timing two ways of computing the same bits, and the switch that turns all
compiled code off. Archives never depend on whether kernels are used: each
owner checks its library against its torch path on a known answer first.

Libraries are compiled with the system C compiler (``$CC``, else ``cc``) into
``<llmpipe cache>/kernels/`` on first use, keyed by the sources, the
headers, the compiler, the flags and the CPU's features. Without a compiler,
on a failed build or check, on GPUs, or with ``LLMPIPE_NATIVE=0``, the torch
path runs instead: slower on the CPU, same results.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from llmpipe.defaults import cache_dir

FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")
SHARED_HEADER = Path(__file__).with_name("simd.h")
"""Included by every owner's sources: the vector forms this CPU has and the helpers they share."""

POINTER, INT64, COUNT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
"""The argument types of the kernels' C signatures: tensors by address, sizes, the thread count."""


def enabled() -> bool:
    """False when ``LLMPIPE_NATIVE=0`` asks for the torch path everywhere."""
    return os.environ.get("LLMPIPE_NATIVE", "1") != "0"


def _cpu_features() -> str:
    """The CPU's feature flags (``-march=native`` code must not run on a CPU without them)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build(sources: Sequence[Path], headers: Sequence[Path] = (), flags: Sequence[str] = FLAGS) -> Path | None:
    """The library compiled from ``sources`` (with :data:`SHARED_HEADER` and ``headers`` on the include
    path), compiling it if needed; None when it cannot be built. (The tests also build with flags that
    leave out the 512-bit loops, as CPUs without AVX-512 run them.)"""
    compiler = os.environ.get("CC", "cc")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    headers = [SHARED_HEADER, *headers]
    texts = [path.read_text() for path in [*sources, *headers]]
    key = hashlib.sha256("\0".join([*texts, version, " ".join(flags), _cpu_features()]).encode())
    target = cache_dir() / "kernels" / f"{sources[0].stem}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    includes = [f"-I{directory}" for directory in dict.fromkeys(str(h.parent) for h in headers)]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            partial = Path(scratch) / target.name
            command = [compiler, *flags, *includes, *map(str, sources), "-o", str(partial)]
            subprocess.run(command, capture_output=True, check=True)
            partial.replace(target)
    except (OSError, subprocess.CalledProcessError):
        return None
    return target


def load(path: Path | None, signatures: dict[str, tuple[list, type | None]]) -> ctypes.CDLL | None:
    """The library at ``path`` with each function's ``(argument types, result type)`` declared; None when
    there is no library or it lacks one of them."""
    if path is None:
        return None
    try:
        library = ctypes.CDLL(str(path))
        for name, (arguments, result) in signatures.items():
            function = getattr(library, name)
            function.argtypes, function.restype = arguments, result
    except (OSError, AttributeError):
        return None
    return library


def fastest_seconds(product: Callable[[], object]) -> float:
    """The best of three timed calls of ``product`` after one to warm up (first-use checks, allocations):
    how the engine picks the faster of two products that give the same bits."""
    product()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        product()
        times.append(time.perf_counter() - start)
    return min(times)
