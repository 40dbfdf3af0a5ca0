"""Choosing a coding by total size: learn:N takes the best vector, auto only one that clears the margin."""

import numpy as np
import pytest
import torch

from llmpipe.models.transformer import Transformer
from llmpipe.pipeline.steer import held_out_rows
from llmpipe.steering.quantise import uniform
from llmpipe.steering.select import AUTO_MARGIN, Estimate, choose, held_out_bits, rank
from tests.tiny_model import DATA

TEXT = (DATA / "alice_chapter1.txt").read_bytes()
CODED = uniform(np.zeros((1, 4), dtype=np.float32), 0.25, "gaussian")


def option(vector_bits: int, text_bits: float, coded=CODED) -> Estimate:
    return Estimate(coded, vector_bits, text_bits / 10, text_bits)


@pytest.mark.parametrize(
    ("saving", "cost", "auto_keeps"),
    [(1000, 200, True), (1000, 201, False), (100, 0, True), (-5, 10, False)],
)
def test_auto_keeps_a_vector_only_when_its_saving_clears_the_margin(saving, cost, auto_keeps):
    none = Estimate(None, 0, 1000.0, 10_000.0)
    learned = option(cost, 10_000.0 - saving)
    assert AUTO_MARGIN == 5.0
    assert choose([none, learned], auto=True) is (learned if auto_keeps else none)
    assert choose([none, learned], auto=False) is learned  # learn:N always keeps its vector


def test_learn_takes_the_smallest_total_not_the_smallest_vector():
    cheap, good = option(100, 9_950.0), option(300, 9_600.0)
    assert choose([Estimate(None, 0, 1000.0, 10_000.0), cheap, good], auto=False) is good


def test_rank_measures_each_vector_once_and_sorts_by_total(tiny_model, monkeypatch):
    from llmpipe.steering import select

    network = Transformer(tiny_model.config, tiny_model.weights, torch.float32)
    held = held_out_rows(TEXT, tiny_model.tokenizer)[:2]
    values = np.full((2, tiny_model.config.hidden_size), 0.1, dtype=np.float32)
    options = [uniform(values, 2.0**-4, prior) for prior in ("gaussian", "empirical")]
    calls = []
    monkeypatch.setattr(select, "held_out_bits", lambda *a: calls.append(a[2]) or held_out_bits(*a))
    estimates = rank(network, held, options, lambda coded: 0 if coded is None else coded.bits, 2.0)
    assert len(calls) == 2  # none, and the one vector both priors share
    assert [e.total for e in estimates] == sorted(e.total for e in estimates)
    none = next(e for e in estimates if e.coded is None)
    assert none.projected_text_bits == 2.0 * none.held_out_bits == 2.0 * held_out_bits(network, held, None)
