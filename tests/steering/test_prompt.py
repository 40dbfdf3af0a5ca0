"""The steering prompt: parsing, the header record, exactness of the shared prompt cache, round trips."""

import hashlib
import io
import re

import pytest
import torch

from llmpipe.errors import ArchiveError, UsageError
from llmpipe.pipeline.compress import Compressor
from llmpipe.pipeline.decompress import Decompressor
from llmpipe.steering.prompt import parse_steer, prompt_from_record, random_prompt
from tests.bad_archives import split_header, with_header
from tests.cli.test_cli import run
from tests.conftest import ARCHITECTURES
from tests.tiny_model import DATA

TEXT = (DATA / "alice_chapter1.txt").read_bytes()
MODES = ["none", "text:Alice in Wonderland, chapter one.", "random:4", "random:3:7", "learn:2"]


def test_random_prompt_is_pinned():
    """The vectors come from SHA-256 alone: the same bits on every machine, now and later."""
    prompt = random_prompt(3, 5, 0.0625, 64)
    digest = hashlib.sha256(prompt.vectors.astype("<f4").tobytes()).hexdigest()
    assert digest == "ebc0ff229706f137ac447ddcd2ca1f951e0ab4489e904318458a1edb701ccce9"
    assert prompt.vectors.shape == (3, 64) and abs(prompt.vectors).max() == 0.0625
    assert prompt_from_record(prompt.record(), 64, 100).vectors.tobytes() == prompt.vectors.tobytes()


@pytest.mark.parametrize("spec", ["", "text:", "random:0", "random:x", "random:257", "learn", "none:1"])
def test_bad_steer_values_are_refused(tiny_model, spec):
    with pytest.raises(UsageError, match="--steer"):
        parse_steer(spec, tiny_model)


@pytest.mark.parametrize(
    "record",
    [
        "text",
        {"mode": "text", "text": "a", "tokens": []},
        {"mode": "text", "text": "a", "tokens": [10**9]},
        {"mode": "random", "tokens": 4, "seed": -1, "scale": 0.5},
        {"mode": "random", "tokens": 4, "seed": 0, "scale": 1},
        {"mode": "learned"},
        {"mode": "learned", "tokens": 1, "step": 0.3, "prior": "gaussian", "prior_scale": 16, "data": ""},
        {"mode": "learned", "tokens": 1, "step": 0.25, "prior": "gaussian", "prior_scale": 16, "data": "!"},
        {"mode": "learned", "tokens": 1, "step": 0.25, "prior": "laplace", "prior_scale": 16, "data": ""},
        {"mode": "unknown"},
    ],
)
def test_damaged_steering_records_are_refused(record):
    with pytest.raises(ArchiveError):
        prompt_from_record(record, 64, 300)


def test_exact_text_prompt_equals_the_prompt_tokens_run_inline(tiny_model):
    """The prompt's cache, computed once and copied into every row, gives the very tables of running the
    prompt's tokens in front of each row: exact numerics stay exact with a prompt."""
    from llmpipe.engine.exact_engine import ExactEngine

    prompt = parse_steer("text:The first chapter.", tiny_model)
    engine = ExactEngine(tiny_model, threads=1)
    rows = [tiny_model.tokenizer.encode(TEXT[a : a + 200])[:40] for a in (0, 500, 900)]
    inputs = [[tiny_model.tokenizer.prime_token] + [tiny_model.tokenizer.model_input(s) for s in r] for r in rows]
    inline = [list(prompt.tokens) + x for x in inputs]
    expected = {i: logits for i, _, logits in engine.scores(inline, [len(prompt.tokens)] * 3)}
    engine.set_prompt(prompt)
    steered = {i: logits for i, _, logits in engine.scores(inputs, [0] * 3)}
    assert all(torch.equal(steered[i], expected[i]) for i in range(3))
    session = engine.session(3, 41)  # the decoder's path: the shared cache, one position per step
    stepped = [session.step([x[p] for x in inputs]) for p in range(41)]
    assert all(torch.equal(stepped[p][i], expected[i][p]) for p in range(41) for i in range(3))
    assert engine.max_positions == tiny_model.config.max_position_embeddings - len(prompt.tokens)


@pytest.mark.parametrize("numerics", ["exact", "float"])
@pytest.mark.parametrize("steer", MODES)
def test_every_mode_round_trips_at_another_batch(tiny_model, numerics, steer):
    """With context-window restarts (the prompt survives them) and a decoder batch unlike the encoder's."""
    data = TEXT[:3000]
    compressor = Compressor(
        tiny_model,
        chunk_size=1024,
        batch=3,
        threads=1,
        numerics=numerics,
        steer=steer,
        steer_epochs=5,
        context=64,
        overlap=16,
    )
    sink = io.BytesIO()
    stats = compressor.compress_stream(io.BytesIO(data), sink)
    assert stats.llm_input_bytes > 2000
    record = split_header(sink.getvalue())[0]["steering"]
    assert (record or {"mode": "none"})["mode"] == {"learn": "learned"}.get(steer.split(":")[0], steer.split(":")[0])
    assert Decompressor(tiny_model, batch=2).decompress(sink.getvalue()) == data


@pytest.mark.parametrize("arch", ARCHITECTURES[1:])
def test_virtual_tokens_steer_other_architectures(tiny_models, arch):
    """GPT-2's learned positions and GPT-NeoX's partial rotary embeddings count the prompt's positions."""
    model = tiny_models[arch]
    data = TEXT[:2000]
    archive = Compressor(model, chunk_size=1024, batch=2, threads=1, steer="random:5").compress(data)
    assert Decompressor(model, batch=1).decompress(archive) == data


def test_learned_prompt_is_what_the_decoder_rebuilds(tiny_model):
    """The encoder codes with the vector decoded back from the header, so both sides hold the same numbers."""
    from llmpipe.steering.prompt import prompt_from_record

    compressor = Compressor(tiny_model, chunk_size=1024, batch=2, threads=1, steer="learn:3", steer_epochs=5)
    archive = compressor.compress(TEXT[:2000])
    record = split_header(archive)[0]["steering"]
    rebuilt = prompt_from_record(record, tiny_model.config.hidden_size, tiny_model.config.vocab_size)
    assert rebuilt.vectors.tobytes() == compressor.prompt.vectors.tobytes() and rebuilt.vectors.shape[0] == 3
    assert Decompressor(tiny_model, batch=1).decompress(archive) == TEXT[:2000]


@pytest.mark.parametrize("numerics", ["exact", "float"])
@pytest.mark.parametrize("coding", ["uniform, gaussian", "uniform, empirical", "lloyd, empirical"])
def test_every_quantiser_and_prior_round_trips_at_another_batch(tiny_model, monkeypatch, numerics, coding):
    """``learn:N`` with each coding forced: the decoder rebuilds the vector from the header and decodes at
    another batch size, with either engine."""
    from llmpipe.pipeline import steer as module

    quantiser, prior = coding.split(", ")
    picked = []

    def pick(estimates, auto):
        found = [e for e in estimates if e.coded and e.coded.coding["quantiser"] == quantiser]
        picked.append(next(e for e in found if e.coded.coding["prior"] == prior))
        return picked[-1]

    monkeypatch.setattr(module, "choose", pick)
    data = TEXT[:3000]
    compressor = Compressor(
        tiny_model, chunk_size=512, batch=3, threads=1, numerics=numerics, steer="learn:2", steer_epochs=3
    )
    archive = compressor.compress(data)
    record = split_header(archive)[0]["steering"]
    assert record == {"mode": "learned", "tokens": 2, **picked[0].coded.coding}
    assert Decompressor(tiny_model, batch=2).decompress(archive) == data


def test_auto_costs_nothing_on_small_inputs(tiny_model):
    """Under :data:`AUTO_MIN_BYTES` of input ``auto`` does not train: the archive is the ``none`` one."""
    data = TEXT[:5000]
    plain = Compressor(tiny_model, chunk_size=1024, batch=2, threads=1, steer="none").compress(data)
    lines: list[str] = []
    auto = Compressor(tiny_model, chunk_size=1024, batch=2, threads=1, steer="auto", log=lines.append)
    assert auto.compress(data) == plain
    assert any(line.startswith("steering: auto: none") for line in lines)


@pytest.mark.parametrize("margin", [0.0, 1e9])
def test_auto_measures_on_held_out_rows_and_decides(tiny_model, monkeypatch, margin):
    """Over the threshold ``auto`` learns one token, ranks every coding and none by projected total, and
    keeps the best vector only when its saving clears the margin; either way the archive decodes."""
    from llmpipe.pipeline import steer as module
    from llmpipe.steering import select

    monkeypatch.setattr(module, "AUTO_MIN_BYTES", 4000)
    monkeypatch.setattr(select, "AUTO_MARGIN", margin)
    data = TEXT[:8000]
    lines: list[str] = []
    auto = Compressor(tiny_model, chunk_size=2048, batch=4, threads=1, steer="auto", steer_epochs=5, log=lines.append)
    archive = auto.compress(data)
    ranked = [line for line in lines if "projected total" in line]
    assert len(ranked) == 1 + 11 and any(line.startswith("steering: none:") for line in ranked)
    chosen = next(line for line in lines if line.startswith("steering: auto: chose"))
    record = split_header(archive)[0]["steering"]
    if margin:  # no saving clears a huge margin
        assert chosen == "steering: auto: chose none" and record is None
    else:  # the best learned coding, as ranked
        best = next(line for line in ranked if not line.startswith("steering: none:"))
        assert chosen.removeprefix("steering: auto: chose ") == best.split(": ")[1]
        assert record["mode"] == "learned" and record["tokens"] == 1
    assert Decompressor(tiny_model).decompress(archive) == data


def _written_in_pieces(compressor: Compressor, data: bytes, piece: int = 700) -> bytes:
    sink = io.BytesIO()
    writer = compressor.writer(sink)
    for start in range(0, len(data), piece):
        writer.write(data[start : start + piece])
    writer.close()
    return sink.getvalue()


@pytest.mark.parametrize("size", [5000, 9000])
def test_auto_reads_ahead_and_decides_on_the_input_size(tiny_model, monkeypatch, size):
    """``auto`` decides on how much input there is, not on the first window: it reads up to
    :data:`AUTO_MIN_BYTES` ahead before the header, trains only when the input reaches it (on the first
    window alone), and never trains below it. Reading ahead changes no byte: with no vector kept the archive
    is the ``none`` one, windows cut as when written window by window."""
    from llmpipe.pipeline import steer as module
    from llmpipe.steering import select

    monkeypatch.setattr(module, "AUTO_MIN_BYTES", 7000)
    monkeypatch.setattr(select, "AUTO_MARGIN", 1e9)  # keep none, so the archives compare
    decisions = []
    steer_on = Compressor.steer_on

    def recorded(self, sample, seen=None):
        decisions.append((len(sample), seen))
        return steer_on(self, sample, seen)

    monkeypatch.setattr(Compressor, "steer_on", recorded)
    data = TEXT[:size]
    settings = {"chunk_size": 1024, "batch": 2, "threads": 1}  # 2,048-byte windows
    plain = Compressor(tiny_model, **settings, steer="none").compress(data)
    lines: list[str] = []
    auto = Compressor(tiny_model, **settings, steer="auto", steer_epochs=2, log=lines.append)
    assert _written_in_pieces(auto, data) == plain
    sample, seen = decisions[-1]
    assert sample <= 2048 and min(size, 7000) <= seen <= size  # the first window; the input read up to the bar
    trained = any("epoch" in line for line in lines)
    assert trained == (size >= 7000)
    assert any(line == "steering: auto: chose none" for line in lines) == trained


def test_auto_does_not_train_for_windows_zstd_codes_better(tiny_model, monkeypatch):
    """Binary-like data goes to zstd blocks, where a vector would be paid for and never used."""
    from llmpipe.pipeline import steer as module

    monkeypatch.setattr(module, "AUTO_MIN_BYTES", 4000)
    data = bytes(range(256)) * 40
    lines: list[str] = []
    auto = Compressor(tiny_model, chunk_size=2048, batch=4, threads=1, steer="auto", log=lines.append)
    plain = Compressor(tiny_model, chunk_size=2048, batch=4, threads=1, steer="none")
    assert auto.compress(data) == plain.compress(data)
    assert any("no better than zstd" in line for line in lines) and not any("epoch" in line for line in lines)


def test_a_changed_prompt_fails_the_checksum_not_silently(tiny_model):
    from llmpipe.errors import ChecksumError

    archive = Compressor(tiny_model, chunk_size=1024, batch=2, threads=1, steer="random:4").compress(TEXT[:2000])
    header, _ = split_header(archive)
    header["steering"]["seed"] = 1
    with pytest.raises(ChecksumError):
        Decompressor(tiny_model).decompress(with_header(archive, header))


def test_cli_steer_and_listing(tiny_model_dir, tmp_path):
    model = ["--model", str(tiny_model_dir), "--chunk-size", "1K"]
    done = run(["-c", *model, "--steer", "text:Alice"], TEXT[:2000])
    assert done.returncode == 0, done.stderr
    (tmp_path / "a.llmp").write_bytes(done.stdout)
    listed = run(["-l", "-v", str(tmp_path / "a.llmp")]).stdout.decode()
    assert re.search(r"steering text 'Alice' \(\d+ tokens\) \(\d+ bytes\)", listed), listed
    assert run(["-d", *model], done.stdout).stdout == TEXT[:2000]
    refused = run(["-c", *model, "--steer", "learn:0"], TEXT[:100])
    assert refused.returncode == 1 and refused.stderr.count(b"\n") == 1 and b"--steer" in refused.stderr


def test_the_memory_plan_counts_the_prompts_positions(tiny_model):
    from llmpipe.codec.context import ContextWindow
    from llmpipe.pipeline.plan import coding_plan

    settings = {"numerics": "exact", "dtype": "float32", "load_in_8bit": False, "device": "cpu", "batch": 4}
    common = {"chunk_size": 4096, "context": ContextWindow(64, 16), "mixing": False, "limit": None}
    plain = coding_plan(tiny_model.config, **settings, **common)
    steered = coding_plan(tiny_model.config, **settings, **common, prompt=10)
    assert steered.parts["KV cache"] == plain.parts["KV cache"] * (64 + 10) // 64


def test_listing_names_each_mode():
    from llmpipe.cli.listing import _steering

    assert _steering(None) == "none"
    assert _steering({"mode": "text", "text": "Hi", "tokens": [5, 6]}) == "text 'Hi' (2 tokens)"
    assert _steering({"mode": "random", "tokens": 4, "seed": 9, "scale": 0.5}) == "random (4 virtual tokens, seed 9)"
    learned = {"mode": "learned", "tokens": 2, "step": 0.25, "prior": "gaussian", "prior_scale": 40, "data": ""}
    assert _steering(learned) == "learned (2 virtual tokens, uniform step 0.25, gaussian prior)"
    lloyd = {**learned, "quantiser": "lloyd", "levels": [-3, 0, 3], "prior": "empirical", "low": 0, "high": 2}
    assert _steering(lloyd) == "learned (2 virtual tokens, Lloyd-Max 3 levels, empirical prior)"
