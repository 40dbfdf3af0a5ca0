"""What the compiled kernels' tests share (``tests/engine/test_kernels.py``, ``tests/codec/test_kernels.py``):
the switch to the torch path everywhere, and every build of an owner's kernels that this CPU can run."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch

from llmpipe.codec import frequencies
from llmpipe.engine import integer_ops
from llmpipe.numerics import native

needs_compiler = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler here: the torch path runs")

BUILDS = {
    "native": native.FLAGS,
    "avx2": (*native.FLAGS, "-mno-avx512f"),  # what a CPU with AVX2 but no AVX-512 runs
    "portable": (*native.FLAGS, "-mno-avx512f", "-mno-avx2"),  # the plain C loops (other CPUs)
}
"""The same sources built three ways; where this CPU has no AVX-512, "avx2" is the native build again."""


@contextmanager
def torch_only() -> Iterator[None]:
    """Inside: no compiled kernels anywhere (as without a C compiler), so everything runs the torch path."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(integer_ops, "_checked_kernels", lambda: None)
        patch.setattr(frequencies, "_checked_kernels", lambda: None)
        yield


def kernel_fixtures(kernels_for: Callable, compiled: Callable[..., object]) -> tuple:
    """An owner's two module fixtures: ``kernels``, what ``kernels_for`` gives the CPU here (its checked
    kernels), and ``built``, each build of them this machine can run (every kernel test runs on all)."""

    @pytest.fixture(scope="module")
    def kernels():
        found = kernels_for(torch.device("cpu"))
        assert found is not None, "a C compiler is here, yet the kernels were not built or failed their check"
        return found

    @pytest.fixture(scope="module", params=list(BUILDS))
    def built(request, kernels):
        return _build(request.param, kernels, compiled)

    return kernels, built


def _build(name: str, checked, compiled: Callable[..., object]):
    """The ``name`` build (a key of :data:`BUILDS`) of an owner's kernels: ``checked`` (what the engine or
    codec uses here) for the native one, else ``compiled`` with that build's flags."""
    if name == "native":
        return checked
    if name == "avx2" and "avx512f" not in native._cpu_features().split():
        pytest.skip("no AVX-512 here: the native build is the AVX2 one")
    kernels = compiled(BUILDS[name])
    assert kernels is not None, f"a C compiler is here, yet the {name} build failed"
    return kernels
