"""Learning a prompt: training lowers the sample's code length with the quantised vector."""

import math

from llmpipe.compressor import sample_rows
from llmpipe.steering.hyperprior import limit_of, scale_for
from llmpipe.steering.train import learn_vector
from tests.tiny_model import DATA

TEXT = (DATA / "alice_chapter1.txt").read_bytes()


def test_training_lowers_the_sample_bits(tiny_model):
    rows = sample_rows(TEXT, tiny_model.tokenizer)
    assert len(rows) == 8 and all(len(r) == 257 and r[0] == tiny_model.tokenizer.prime_token for r in rows)
    vector = learn_vector(tiny_model, rows[:4], 3, epochs=30)
    assert vector.sample_bits_after < vector.sample_bits_before
    assert len(vector.q) == 3 * tiny_model.config.hidden_size and vector.epochs == 30
    assert math.log2(vector.step).is_integer()
    assert max(map(abs, vector.q)) <= limit_of(scale_for(vector.q))
