"""The tiny Llama model the fast tests run on, and how it was built.

A random model would lose to zstd on every chunk and never exercise LLM
coding, so the model is trained for a few seconds on a public-domain text
shipped in ``tests/data``, with a byte-level BPE tokenizer trained on the same
text. Training in floating point is not reproducible across machines, so the
result is committed (``tests/data/tiny-llama``, float16 weights, about 200 KB)
and the golden archive in ``tests/golden`` is made with it; regenerate both
only on purpose: ``python -m tests.tiny_model`` then
``GENERATE_EXPECTED=1 pytest tests/test_golden.py``. llmpipe prepares the
directory through the same code path as a user's ``--model DIR``.
"""

from __future__ import annotations

from pathlib import Path

import torch

DATA = Path(__file__).parent / "data"
COMMITTED = DATA / "tiny-llama"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tiny_model(target: Path, *, vocab_size: int = 384, train_steps: int = 120, seed: int = 0) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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

    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
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
    model = LlamaForCausalLM(config)
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
    model.to(torch.float16)  # halves the committed file; llmpipe converts to float32 when preparing
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    fast.save_pretrained(target)
    return target


if __name__ == "__main__":
    print(build_tiny_model(COMMITTED))
