"""Building the compiled kernels (``llmpipe.numerics.native``): optional, and off when asked."""

import pytest
import torch

from llmpipe.codec import frequencies
from llmpipe.engine import integer_ops

CHECKED = (integer_ops, frequencies)
"""The owners of compiled kernels, each with its checked, cached ``kernels_for``."""


def _none_found() -> bool:
    for owner in CHECKED:
        owner._checked_kernels.cache_clear()
    try:
        return all(owner.kernels_for(torch.device("cpu")) is None for owner in CHECKED)
    finally:
        for owner in CHECKED:
            owner._checked_kernels.cache_clear()


def test_without_a_compiler_the_torch_path_runs(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("LLMPIPE_CACHE", str(tmp_path))
    assert _none_found()


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("LLMPIPE_NATIVE", "0")
    assert _none_found()


@pytest.mark.parametrize("owner", CHECKED, ids=lambda owner: owner.__name__)
def test_kernels_that_disagree_with_torch_are_not_used(owner, monkeypatch):
    """The known-answer check at the first use turns a wrong kernel off (here: every check fails)."""
    owner._checked_kernels.cache_clear()
    monkeypatch.setattr(owner, "kernels_agree", lambda kernels: False)
    try:
        assert owner.kernels_for(torch.device("cpu")) is None
    finally:
        owner._checked_kernels.cache_clear()
