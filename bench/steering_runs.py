"""The steering experiments (``bench/steering.py run``, ``auto``, ``curve``, ``hyperpriors``): what each
``--steer`` mode and each coding of a learned vector costs and saves, measured on corpus files."""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from bench.common import CORPUS, RESULTS, save
from llmpipe.engine.protocol import prompt_rows
from llmpipe.models import cache
from llmpipe.models.cache import LoadedModel
from llmpipe.models.transformer import Transformer
from llmpipe.pipeline.compress import Compressor
from llmpipe.pipeline.steer import (
    AUTO_MIN_BYTES,
    AUTO_TOKENS,
    TRAIN_ROWS,
    TRAIN_TOKENS,
    held_out_rows,
    sample_rows,
)
from llmpipe.steering.hyperprior import (
    MAX_SCALE_UNITS,
    SCALE_UNITS,
    gaussian_frequencies,
    limit_of,
    scale_for,
)
from llmpipe.steering.prompt import SteeringPrompt, learned_prompt, parse_steer
from llmpipe.steering.quantise import decode_coding, quantiser_label
from llmpipe.steering.select import best_learned, held_out_bits
from llmpipe.steering.train import PromptTrainer

STUDY_MODES = ("none", "fixed string", "static random soft prompt", "learned")

AUTO_SLICE = 128 * 1024
"""Bytes of each slice ``auto`` measures a kept vector on."""


def run(args: argparse.Namespace) -> None:
    data = (CORPUS / args.file).read_bytes()[: args.bytes]
    model = cache.load(args.model)
    learner = Compressor(model, steer=f"learn:{args.tokens}", steer_epochs=args.epochs, steer_seconds=1e9, log=print)
    started = time.perf_counter()
    choice = learner.steer_on(data)
    learn_seconds = time.perf_counter() - started
    trained = choice.vector.values
    codings = [
        {
            "coding": e.label,
            "record": e.coded.coding,
            "vector_bits": e.vector_bits,
            "data_bits": e.coded.bits,
            "bits_per_value": e.coded.bits / trained.size,
            "mse": float(np.mean((e.coded.values.astype(np.float64) - trained) ** 2)),
            "held_out_bits": e.held_out_bits,
            "projected_total": e.total,
        }
        for e in choice.estimates
        if e.coded is not None
    ]
    none = next(e for e in choice.estimates if e.coded is None)
    held_out = held_out_rows(data, model.tokenizer)
    network = Transformer(model.config, model.weights, torch.float32)
    projection = none.projected_text_bits / none.held_out_bits
    prompts: dict[str, SteeringPrompt | None] = {
        "none": None,
        "fixed string": parse_steer(f"text:{args.text}", model),
        "static random soft prompt": parse_steer(f"random:{args.random_tokens}", model),
        "learned": learned_prompt(choice.chosen.coded),
    }
    modes = []
    for mode, prompt in prompts.items():
        held = (
            none.held_out_bits
            if prompt is None
            else held_out_bits(network, held_out, prompt_rows(prompt, network.embed))
        )
        row = {
            "mode": mode,
            "spec": prompt.record() if prompt else None,
            "vector_bits": learner.header_bits(prompt),
            "held_out_bits": held,
            "projected_text_bits": held * projection,
        }
        if mode in args.measure or (mode == "learned" and "learned" in args.measure):
            row.update(_compress(model, prompt, data, learner.header_bits(prompt)))
        modes.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "spec"}), flush=True)
    scale_priors = _all_scale_hyperpriors(codings, trained.shape, network.embed)
    save(
        args.name,
        {
            "kind": "steering",
            "file": args.file,
            "tokens": args.tokens,
            "bytes": len(data),
            "epochs": choice.vector.epochs,
            "learn_seconds": learn_seconds,
            "sample_bits_before": choice.vector.sample_bits_before,
            "sample_bits_after": choice.vector.sample_bits_after,
            "chosen": choice.chosen.label,
            "auto_applies": args.tokens == AUTO_TOKENS,
            "codings": codings,
            "scale_hyperpriors": [p for p in scale_priors if p],
            "modes": modes,
        },
    )


def auto(args: argparse.Namespace) -> None:
    """What ``--steer auto`` decides on a whole corpus file (its first window), and, when it keeps a vector,
    that vector measured for real on 128 KiB slices (``--slices``: offsets), with and without it.
    ``--as-if-long``: decide as on an input of at least ``AUTO_MIN_BYTES`` (every corpus file is shorter),
    to measure what training on the file's first window would keep."""
    data = (CORPUS / args.file).read_bytes()
    model = cache.load(args.model)
    learner = Compressor(model, steer="auto", log=print)
    window = learner.window_size  # the stream's first window, as the CLI reads it
    started = time.perf_counter()
    choice = learner.steer_on(data[:window], seen=max(len(data), AUTO_MIN_BYTES if args.as_if_long else 0))
    seconds = time.perf_counter() - started
    slices = []
    header_bits = learner.header_bits(learner.prompt)
    for start in args.slices if learner.prompt is not None else []:
        piece = data[start : start + AUTO_SLICE]
        if len(piece) < AUTO_SLICE:
            raise SystemExit(f"--slices {start}: the file has no {AUTO_SLICE} bytes there")
        none, kept = (_compress(model, prompt, piece, 0)["archive_bytes"] for prompt in (None, learner.prompt))
        slices.append(
            {"start": start, "none_bytes": none, "kept_bytes": kept, "text_bits_saved": 8 * (none - kept) + header_bits}
        )
        print(json.dumps(slices[-1]), flush=True)
    best = best_learned(choice.estimates) if choice else None
    none_total = next(e.total for e in choice.estimates if e.coded is None) if choice else None
    save(
        args.name,
        {
            "kind": "steering-auto",
            "file": args.file,
            "bytes": len(data),
            "window": window,
            "seconds": seconds,
            "trained": choice is not None,
            "chosen": choice.chosen.label if choice else "none",
            "best": best.label if best else None,
            "vector_bits": best.vector_bits if best else 0,
            "none_projected": none_total,
            "best_projected": best.total if best else None,
            "slices": slices,
        },
    )


CURVE_EPOCHS = (2, 4, 20)


def curve(args: argparse.Namespace) -> None:
    """How a learned token's held-out saving grows with training steps, on a file's first window as
    ``--steer auto`` samples it: whether a few steps foretell what 20 keep (they did not: STEERING.md)."""
    model = cache.load(args.model)
    window = (CORPUS / args.file).read_bytes()[: args.bytes]
    tokenizer = model.tokenizer
    train = sample_rows(window, tokenizer, TRAIN_ROWS, TRAIN_TOKENS)
    held_out = held_out_rows(window, tokenizer)
    network = Transformer(model.config, model.weights, torch.float32)
    held_bytes = sum(len(tokenizer.spellings[x]) for row in held_out for x in row[1:])
    projection = len(window) / held_bytes
    started = time.perf_counter()
    plain = held_out_bits(network, held_out, None)
    evaluation_seconds = time.perf_counter() - started
    trainer = PromptTrainer(network, train, AUTO_TOKENS)
    train_bytes = sum(len(tokenizer.spellings[x]) for row in train for x in row[1:])
    points, training_seconds = [], 0.0
    for epochs in CURVE_EPOCHS:
        started = time.perf_counter()
        trainer.train(epochs - trainer.epochs)
        training_seconds += time.perf_counter() - started
        bits = held_out_bits(network, held_out, torch.from_numpy(trainer.vector().values))
        points.append({"epochs": epochs, "held_out_bits": bits, "projected_saving": (plain - bits) * projection})
        print(f"{args.file}: epoch {epochs}: projected saving {points[-1]['projected_saving']:.0f} bits")
    save(
        args.name,
        {
            "kind": "steering-curve",
            "file": args.file,
            "bytes": len(window),
            "plain_held_out_bits": plain,
            "projection": projection,
            "points": points,
            "training_bits_before": trainer.bits_before,
            "training_losses": trainer.losses,  # each step's training-row bits, before its update
            "training_projection": len(window) / train_bytes,
            "seconds_per_epoch": training_seconds / CURVE_EPOCHS[-1],
            "seconds_per_evaluation": evaluation_seconds,
        },
    )


def hyperpriors(args: argparse.Namespace) -> None:
    """Add the scale-hyperprior comparison to a stored run (made before ``run`` computed it)."""
    path = RESULTS / f"{args.name}.json"
    stored = json.loads(path.read_text())
    model = cache.load(args.model)
    embed = model.weights["model.embed_tokens.weight"]
    shape = (stored.get("tokens", 1), model.config.hidden_size)
    stored["scale_hyperpriors"] = _all_scale_hyperpriors(stored["codings"], shape, embed)
    path.write_text(json.dumps(stored, indent=1))
    print(f"updated {path}")


def _all_scale_hyperpriors(codings: list[dict], shape: tuple[int, int], embed: torch.Tensor) -> list[dict]:
    channel_rms = embed.to(torch.float64).square().mean(0).sqrt().numpy()
    found = [_scale_hyperpriors(c["record"], shape, channel_rms) for c in codings]
    return [f for f in found if f]


SCALE_GROUP = 64
"""Channels per scale of the per-group scale hyperprior."""


def _scale_hyperpriors(record: dict, shape: tuple[int, int], channel_rms: np.ndarray) -> dict | None:
    """Ideal bits of a uniform coding's integers under scale hyperpriors (Balle et al.), against the one
    Gaussian the format codes with: (a) one scale per group of 64 channels, sent as side information
    (counted as 5 bits each); (b) one scale per channel predicted from the model's embedding table (each
    channel's RMS across tokens, times one sent factor of 8 bits: otherwise free side information)."""
    if record["quantiser"] != "uniform" or record["prior"] != "gaussian":
        return None
    q = np.round(decode_coding(record, *shape) / record["step"]).astype(np.int64)

    def gaussian_bits(values: np.ndarray, scale_units: int) -> float:
        table = np.array(gaussian_frequencies(scale_units), dtype=np.float64)
        limit = limit_of(scale_units)
        clamped = np.clip(values, -limit, limit) + limit
        return float(-np.log2(table[clamped] / table.sum()).sum())

    flat = q.reshape(-1)
    single = gaussian_bits(flat, record["prior_scale"])
    groups = q.reshape(shape[0], -1, SCALE_GROUP).transpose(1, 0, 2).reshape(-1, shape[0] * SCALE_GROUP)
    grouped = sum(gaussian_bits(g, scale_for(g.tolist())) + 5 for g in groups)
    relative = channel_rms / np.sqrt(np.mean(channel_rms**2))
    relative = np.maximum(relative, 1e-3)
    factor = round(SCALE_UNITS * float(np.sqrt(np.mean((q / relative[None, :]) ** 2))))  # per-channel Gaussian MLE
    best = 8 + sum(
        gaussian_bits(q[:, c], max(1, min(MAX_SCALE_UNITS, round(factor * relative[c])))) for c in range(shape[1])
    )
    return {
        "coding": quantiser_label(record),
        "single_gaussian": single,
        "per_group": grouped,
        "per_channel_model": best,
    }


def _compress(model: LoadedModel, prompt: SteeringPrompt | None, data: bytes, vector_bits: int) -> dict:
    """Compress ``data`` with ``prompt`` fixed, at the other defaults."""
    compressor = Compressor(model, steer="none")  # a fixed prompt: no learning at the stream's start
    compressor.set_prompt(prompt)
    started = time.perf_counter()
    archive = compressor.compress(data)
    return {
        "archive_bytes": len(archive),
        "measured_text_bits": 8 * len(archive) - vector_bits,
        "compress_seconds": time.perf_counter() - started,
    }
