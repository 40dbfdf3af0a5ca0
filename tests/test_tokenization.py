from hypothesis import given, settings
from hypothesis import strategies as st

SPECIAL_LOOKALIKES = [b"<|endoftext|>", b"<|im_start|>user\n", b"<|im_end|>", b"<repo_name>"]


def test_special_token_text_is_plain_text(tiny_model):
    tok = tiny_model.tokenizer
    for text in SPECIAL_LOOKALIKES:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert len(ids) > 1  # spelt as ordinary text, not collapsed into the special token


def test_invalid_utf8_and_control_bytes(tiny_model):
    tok = tiny_model.tokenizer
    for data in [b"\xff\xfe\x00abc\r\n", b"caf\xc3", b"\xe2\x82", b"\x00" * 10, bytes(range(256)), b"a\r\nb\rc\n"]:
        assert tok.decode(tok.encode(data)) == data


def test_escape_symbols_spell_bytes_missing_from_the_vocabulary(tiny_model):
    tok = tiny_model.tokenizer
    missing = [b for b in range(256) if bytes([b]) not in tok.token_bytes]
    if missing:  # the tiny tokenizer has the full byte alphabet; the default model lacks 21 bytes
        ids = tok.encode(bytes(missing))
        assert all(i >= tok.vocab_size for i in ids)
    assert tok.model_input(tok.vocab_size + 5) == tok.prime_token
    assert tok.alphabet_size == tok.vocab_size + 256


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")))
def test_any_bytes_round_trip(tiny_model, data):
    tok = tiny_model.tokenizer
    ids = tok.encode(data)
    assert tok.decode(ids) == data
    assert all(0 <= i < tok.alphabet_size for i in ids)
