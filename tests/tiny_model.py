"""The tiny models the fast tests run on, and how they are built.

A random model would lose to zstd on every chunk and never exercise LLM
coding, so the model is trained for a few seconds on a public-domain text
shipped in ``tests/data``, with a byte-level BPE tokenizer trained on the same
text. Training in floating point is not reproducible across machines, so the
result is committed (``tests/data/tiny-llama``, float16 weights, about 200 KB)
and the golden archive in ``tests/golden`` is made with it; regenerate both
only on purpose: ``python -m tests.tiny_model`` then
``GENERATE_EXPECTED=1 pytest tests/test_golden.py``. llmpipe prepares the
directory through the same code path as a user's ``--model DIR``.

The GPT-NeoX (Pythia) and GPT-2 models are built the same way, at test time
(``build_tiny_model(target, arch=...)``), from the real configurations of
pythia-70m and gpt2 reduced in size; they only need to be self-consistent.
"""

from __future__ import annotations

from pathlib import Path

import torch

DATA = Path(__file__).parent / "data"
COMMITTED = DATA / "tiny-llama"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tiny_model(
    target: Path, *, arch: str = "llama", vocab_size: int = 384, train_steps: int = 120, seed: int = 0
) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    text = (DATA / "alice_chapter1.txt").read_text(encoding="utf-8")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([text], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    model = AutoModelForCausalLM.from_config(_small_config(arch, tokenizer.get_vocab_size()))
    ids = torch.tensor(tokenizer.encode(text).ids)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    window = 64
    for _ in range(train_steps):
        starts = torch.randint(0, len(ids) - window - 1, (16,))
        batch = torch.stack([ids[s : s + window] for s in starts.tolist()])  # (16, T)
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.to(torch.float16)  # halves the committed file; the model cache keeps float16 too
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    fast.save_pretrained(target)
    return target


def _small_config(arch: str, vocab_size: int):
    """The real configuration of the architecture's smallest study model, shrunk: 2 layers, width 64."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            tie_word_embeddings=True,
            bos_token_id=0,
            eos_token_id=0,
        )
    if arch == "gpt_neox":  # EleutherAI/pythia-70m: parallel residual, rotary on a quarter of each head
        return GPTNeoXConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=2048,
            rotary_pct=0.25,
            rotary_emb_base=10000,
            use_parallel_residual=True,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
            tie_word_embeddings=False,
            bos_token_id=0,
            eos_token_id=0,
        )
    if arch == "gpt2":  # gpt2: learned positions, tied head, tanh GELU
        return GPT2Config(
            vocab_size=vocab_size,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=1024,
            activation_function="gelu_new",
            bos_token_id=0,
            eos_token_id=0,
        )
    raise ValueError(arch)


if __name__ == "__main__":
    print(build_tiny_model(COMMITTED))
