"""Architectures from Hugging Face configurations: the study's models read right, the rest refused."""

import pytest

from llmpipe.errors import ModelError
from llmpipe.models.config import ModelConfig
from llmpipe.models.known import KNOWN_CONFIGS, known_config
from llmpipe.pipeline.plan import parameter_count


@pytest.mark.parametrize(
    "name, arch, millions",
    [
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "llama", 134),
        ("EleutherAI/pythia-70m", "gpt_neox", 70),
        ("EleutherAI/pythia-160m", "gpt_neox", 162),
        ("gpt2", "gpt2", 124),
        ("openlm-research/open_llama_3b", "llama", 3426),
        ("openlm-research/open_llama_7b", "llama", 6738),
    ],
)
def test_study_models_read_to_their_published_sizes(name, arch, millions):
    config = known_config(name)
    assert config.arch == arch
    assert abs(parameter_count(config) / 1e6 - millions) / millions < 0.01


def test_pythia_and_gpt2_details():
    pythia, gpt2 = known_config("EleutherAI/pythia-70m"), known_config("gpt2")
    assert (pythia.head_dim, pythia.rotary_dim, pythia.parallel_residual, pythia.norm) == (64, 16, True, "layer")
    assert (gpt2.positions, gpt2.activation, gpt2.tie_word_embeddings, gpt2.max_position_embeddings) == (
        "learned",
        "gelu_tanh",
        True,
        1024,
    )


def test_unsupported_models_are_refused_by_name():
    with pytest.raises(ModelError, match="'mamba' is not supported"):
        ModelConfig.from_hf({"model_type": "mamba"})
    with pytest.raises(ModelError, match="rope_scaling"):
        ModelConfig.from_hf(KNOWN_CONFIGS["openlm-research/open_llama_7b"] | {"rope_scaling": {"type": "linear"}})
    with pytest.raises(ModelError, match="activation"):
        ModelConfig.from_hf(KNOWN_CONFIGS["gpt2"] | {"activation_function": "relu"})


def test_caches_written_before_other_architectures_still_load():
    legacy = {
        "vocab_size": 97,
        "hidden_size": 48,
        "intermediate_size": 80,
        "num_hidden_layers": 2,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
    }
    config = ModelConfig.from_dict(legacy)
    assert (config.arch, config.norm, config.rotary_dim, config.gated_mlp) == ("llama", "rms", 8, True)
    assert ModelConfig.from_dict(config.to_dict()) == config
