"""Learning a prompt: training lowers the sample's code length with the vector on the training grid."""

import math

import numpy as np
import torch

from llmpipe.models.transformer import Transformer
from llmpipe.pipeline.steer import TRAIN_ROWS, TRAIN_TOKENS, sample_rows
from llmpipe.steering.train import learn_vector
from tests.tiny_model import DATA

TEXT = (DATA / "alice_chapter1.txt").read_bytes()


def test_training_lowers_the_sample_bits(tiny_model):
    rows = sample_rows(TEXT, tiny_model.tokenizer, TRAIN_ROWS, TRAIN_TOKENS)
    assert len(rows) == 8 and all(len(r) == 257 and r[0] == tiny_model.tokenizer.prime_token for r in rows)
    network = Transformer(tiny_model.config, tiny_model.weights, torch.float32)
    vector = learn_vector(network, rows[:4], 3, epochs=30)
    assert vector.sample_bits_after < vector.sample_bits_before
    assert vector.values.shape == (3, tiny_model.config.hidden_size) and vector.epochs == 30
    assert math.log2(vector.step).is_integer()
    assert np.array_equal(np.round(vector.values / vector.step) * vector.step, vector.values)


def test_sample_rows_skip_to_rows_the_training_does_not_see(tiny_model):
    """Held-out rows start half a training stride later: on a window of 8 strides of 4 KB they share no byte."""
    window = TEXT * 8
    tokenizer = tiny_model.tokenizer
    held = sample_rows(window, tokenizer, 4, 64, len(window) // 16)
    train = sample_rows(window, tokenizer, 8, 64)
    assert len(held) == 4 and len(train) == 8 and all(len(r) == 65 for r in held)
