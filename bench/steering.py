"""The steering report: what each ``--steer`` mode and each coding of a learned vector costs and saves.

    python bench/steering.py run --name steering-enwik8-1mb --file enwik/enwik8_first_1000000 \\
        --bytes 1000000 --epochs 20 --text "This is Wikipedia html" --measure none learned
    python bench/steering.py report --write STEERING.md

``run`` learns one virtual token on the slice exactly as ``--steer learn:1``
does (the compressor's own ``steer_on``: training rows, held-out rows,
every coding of ``steering.quantise`` ranked by projected total), projects
the other modes (no prompt, a fixed text, a static random prompt) on the same
held-out rows, and compresses the slice for real with the modes named by
``--measure``, so the projection can be checked against archive sizes.
Results go to ``bench/results/<name>.json``; ``report`` writes every stored
run into STEERING.md (``make steering-report`` runs both).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.bench import CORPUS, RESULTS, save  # noqa: E402
from llmpipe.compressor import (  # noqa: E402
    AUTO_MIN_BYTES,
    AUTO_TOKENS,
    TRAIN_ROWS,
    TRAIN_TOKENS,
    Compressor,
    held_out_rows,
    sample_rows,
)
from llmpipe.models import cache  # noqa: E402
from llmpipe.models.cache import LoadedModel  # noqa: E402
from llmpipe.models.transformer import Transformer  # noqa: E402
from llmpipe.steering.hyperprior import (  # noqa: E402
    MAX_SCALE_UNITS,
    SCALE_UNITS,
    gaussian_frequencies,
    limit_of,
    scale_for,
)
from llmpipe.steering.prompt import SteeringPrompt, learned_prompt, parse_steer, prompt_rows  # noqa: E402
from llmpipe.steering.quantise import decode_coding, quantiser_label  # noqa: E402
from llmpipe.steering.select import AUTO_MARGIN, best_learned, clears_margin, held_out_bits  # noqa: E402
from llmpipe.steering.train import PromptTrainer  # noqa: E402

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


def report(args: argparse.Namespace) -> None:
    runs = [json.loads(p.read_text()) for p in RESULTS.glob("steering-*.json")]
    autos = sorted((json.loads(p.read_text()) for p in RESULTS.glob("auto-*.json")), key=lambda r: r["file"])
    runs.sort(key=lambda r: (r["file"], r.get("tokens", 1)))
    curves = sorted((json.loads(p.read_text()) for p in RESULTS.glob("curve-*.json")), key=lambda r: r["file"])
    lines = [
        "# Steering",
        "",
        f"Generated by `python bench/steering.py report` on {datetime.date.today().isoformat()} from the runs in "
        "`bench/results/steering-*.json` (`make steering-report` reruns them). Default model "
        "(SmolLM2-135M-Instruct Q4_1), exact numerics, the settings that were the defaults when these runs were "
        "made (16 KB rows, 1,024-token window restarted from its last 256; since session 10 the defaults are "
        "32 KB rows and a 2,048/512 window); "
        "the learned prompt is `N` virtual tokens of 576 values each (`--steer learn:N`, N in each section's title).",
        "",
        "How the numbers are made: the prompt is trained (Adam, straight-through quantisation on the finest grid) "
        "on 8 rows of 256 tokens spread over the slice, then every coding is measured on 4 *held-out* rows of "
        "1,024 tokens taken between the training rows, and the held-out bits are scaled to the slice by bytes "
        "(*projected*). *vector bits* is what the prompt adds to the archive's zstd-compressed header, measured "
        "on the real header (record, JSON keys and base64 included). Rows marked *measured* were compressed for "
        "real; their text bits are the archive minus the vector. A projected row's text bits are the measured "
        "no-prompt archive's plus the held-out difference, scaled (held-out bits under the float model, without "
        "the history mixer, differ from the archive's in absolute terms, not much in differences).",
        "",
        "The rows follow the source study's two tables (pythia-70m, 50 KB of enwik8, 2 KB chunks), which counted "
        "text bits only: its trained vector cost about 690,000 bits to save 12,000. Here the vector is paid for in "
        "the header, so the question is the total.",
        "",
    ]
    _share_measured_none(runs)
    for r in runs:
        lines += _run_section(r)
    if not runs:
        lines.append("No runs stored yet.")
    else:
        lines += _auto_section(autos)
        lines += _curve_section(curves)
        lines += _summary(runs, autos)
    text = "\n".join(lines) + "\n"
    if args.write:
        Path(args.write).write_text(text)
        print(f"wrote {args.write}")
    else:
        print(text)


def _share_measured_none(runs: list[dict]) -> None:
    """A run that did not compress without a prompt takes that measurement from a run on the same bytes (its
    held-out rows, and so its projection, are the same), marked as borrowed."""
    for r in runs:
        none = r["modes"][0]
        if "archive_bytes" in none:
            continue
        for other in runs:
            twin = other["modes"][0]
            same_rows = abs(twin["held_out_bits"] - none["held_out_bits"]) < 1e-6 * none["held_out_bits"]
            if other["file"] == r["file"] and other["bytes"] == r["bytes"] and "archive_bytes" in twin and same_rows:
                none.update(
                    {k: twin[k] for k in ("archive_bytes", "measured_text_bits")}, borrowed_from=other["command"]
                )
                break


def _run_section(r: dict) -> list[str]:
    m = r["machine"]
    lines = [
        f"## {r['file']}, first {r['bytes']:,} bytes, learn:{r.get('tokens', 1)}",
        "",
        f"`{r['command']}` on {r['date']}; {m['cpu']}, {m['cores']} cores. Training: {r['epochs']} epochs in "
        f"{r['learn_seconds']:.0f} s (ranking included); training rows {r['sample_bits_before']:.0f} -> "
        f"{r['sample_bits_after']:.0f} bits.",
        "",
        "| steering | vector bits | text bits | total bits | bpb | vs none | |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = [(row, *_text_bits(row, r["modes"][0])) for row in r["modes"]]
    none_total = rows[0][0]["vector_bits"] + rows[0][1]
    for row, text_bits, how in rows:
        total = row["vector_bits"] + text_bits
        label = row["mode"] + (f" ({r['chosen']})" if row["mode"] == "learned" else "")
        lines.append(
            f"| {label} | {row['vector_bits']:,} | {text_bits:,.0f} | {total:,.0f} | {total / r['bytes']:.4f} | "
            f"{(total - none_total) / none_total:+.2%} | {how} |"
        )
    lines += [
        "",
        "Every coding of the learned vector (the quantiser sets the vector; the prior only its bits):",
        "",
        "| coding | vector bits | coded bits/value | MSE | held-out text bits | projected total |",
        "|---|---|---|---|---|---|",
    ]
    for c in sorted(r["codings"], key=lambda c: c["projected_total"]):
        lines.append(
            f"| {c['coding']} | {c['vector_bits']:,} | {c['bits_per_value']:.2f} | {c['mse']:.2e} | "
            f"{c['held_out_bits']:,.0f} | {c['projected_total']:,.0f} |"
        )
    if r.get("scale_hyperpriors"):
        lines += [
            "",
            "Scale hyperpriors (ideal bits of the uniform codings' integers; not in the format unless they win): "
            f"one Gaussian (what the format codes), one scale per group of {SCALE_GROUP} channels sent as side "
            "information, one scale per channel predicted from the model's embedding table (free) times a sent "
            "factor:",
            "",
            "| coding | one Gaussian | per group | per channel (model) |",
            "|---|---|---|---|",
        ]
        for p in r["scale_hyperpriors"]:
            lines.append(
                f"| {p['coding']} | {p['single_gaussian']:,.0f} | {p['per_group']:,.0f} | "
                f"{p['per_channel_model']:,.0f} |"
            )
    lines += ["", *_verdict(r), ""]
    return lines


def _best_coding(r: dict) -> dict:
    return min(r["codings"], key=lambda c: c["projected_total"])


def _savings(r: dict) -> tuple[dict, dict, int, float] | None:
    """The none and learned rows and the learned prompt's measured and projected text saving, when both
    archives were measured."""
    modes = {row["mode"]: row for row in r["modes"]}
    none, learned = modes["none"], modes["learned"]
    if "archive_bytes" not in none or "archive_bytes" not in learned:
        return None
    measured = none["measured_text_bits"] - learned["measured_text_bits"]
    return none, learned, measured, none["projected_text_bits"] - learned["projected_text_bits"]


def _provenance(r: dict) -> str:
    return f"`{r['command']}` ({r['date']}{', ' + r['note'] if r.get('note') else ''})"


def _auto_section(autos: list[dict]) -> list[str]:
    """``--steer auto`` on whole corpus files: its choice on the first window, and kept vectors measured."""
    if not autos:
        return []
    lines = [
        "## `--steer auto` on the large corpus files",
        "",
        f"What training on each file's first window (the CLI's, batch x chunk size) keeps, as `auto` does on "
        f"inputs of at least {AUTO_MIN_BYTES:,} bytes, and, where it keeps "
        f"a vector, that vector measured for real on {AUTO_SLICE // 1024} KiB slices compressed with and without "
        "it (*text bits saved* = the archive difference plus the vector's header bits: positive, the vector "
        "earns that much there). Commands: " + "; ".join(_provenance(r) for r in autos) + ".",
        "",
        "| file | bytes | first window | training kept | best vector's bits | its projected saving on the window | "
        f"slices: text bits saved | auto today ({AUTO_MARGIN:g}x) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in autos:
        saving = r["none_projected"] - r["best_projected"] + r["vector_bits"] if r["trained"] else 0
        projected = f"{saving:,.0f} text bits ({r['best']})" if r["trained"] else "(not trained)"
        measured = ", ".join(f"at {x['start']:,}: {x['text_bits_saved']:+,}" for x in r["slices"]) or "-"
        kept = r["trained"] and clears_margin(saving, r["vector_bits"])
        today = r["best"] if kept and r["bytes"] >= AUTO_MIN_BYTES else "none" + (" (input too short)" if kept else "")
        lines.append(
            f"| {r['file']} | {r['bytes']:,} | {r['window']:,} | {r['chosen']} | {r['vector_bits']:,} | "
            f"{projected} | {measured} | {today} |"
        )
    return [*lines, ""]


def _curve_section(curves: list[dict]) -> list[str]:
    """How a learned token's saving grows with training steps, and what one decision costs."""
    if not curves:
        return []
    steps = [p["epochs"] for p in curves[0]["points"]]
    lines = [
        "## How the saving grows with training steps",
        "",
        "One learned token trained on a file's first window as `auto` samples it, its held-out saving projected "
        "to the window after each number of steps, beside the training rows' own saving (bits before training "
        "minus the loss at that step, projected to the window by bytes). Commands: "
        + "; ".join(_provenance(r) for r in curves)
        + ".",
        "",
        "| file | window | "
        + " | ".join(f"held-out saving after {n}" for n in steps)
        + " | "
        + " | ".join(f"training rows' saving after {n}" for n in steps)
        + " | s per step | s per held-out evaluation |",
        "|---|---|" + "---|" * (2 * len(steps) + 2),
    ]
    for r in curves:
        losses = r["training_losses"]
        trained = [  # the loss at step n + 1 is measured after n updates; the last step's after-loss is not stored
            (r["training_bits_before"] - losses[min(n, len(losses) - 1)]) * r["training_projection"] for n in steps
        ]
        lines.append(
            f"| {r['file']} | {r['bytes']:,} | "
            + " | ".join(f"{p['projected_saving']:+,.0f}" for p in r["points"])
            + " | "
            + " | ".join(f"{t:+,.0f}" for t in trained)
            + f" | {r['seconds_per_epoch']:.1f} | {r['seconds_per_evaluation']:.0f} |"
        )
    lines += [
        "",
        "After 2 or 4 steps world192.txt, which keeps a vector after 20, looks no better than enwik8, which does "
        "not (its held-out saving is even negative then): a probe of a few steps cannot make `auto`'s choice. "
        "What the choice costs is fixed by the first window, not the input: 20 steps and 8 held-out evaluations "
        "(no prompt and 7 distinct codings), 10-14 minutes on this machine. `auto` therefore decides by the "
        f"input's size first: under {AUTO_MIN_BYTES:,} bytes (read ahead before the header) it trains nothing, "
        "at no cost; above, the decision is a few percent of the coding's time.",
        "",
    ]
    return lines


def _summary(runs: list[dict], autos: list[dict]) -> list[str]:
    """Where a learned vector pays, from the measured runs: saving per byte, break-even size, projection."""
    lines = ["## Where steering pays", ""]
    for r in runs:
        found = _savings(r)
        if found is None:
            best = _best_coding(r)
            net = best["projected_total"] - r["modes"][0]["projected_text_bits"]
            lines.append(
                f"- {r['file']} ({r['bytes']:,} bytes, learn:{r.get('tokens', 1)}, {r['epochs']} epochs, projected "
                f"only): the best coding ({best['coding']}, {best['vector_bits']:,} bits) projects {net:+,.0f} "
                "bits against none."
            )
            continue
        none, learned, saving, projected = found
        per_kb = saving / (r["bytes"] / 1024)
        even = learned["vector_bits"] / per_kb if per_kb > 0 else float("inf")
        lines.append(
            f"- {r['file']} ({r['bytes']:,} bytes, learn:{r.get('tokens', 1)}, {r['epochs']} epochs): the vector "
            f"saved {saving:,} text bits ({saving / none['measured_text_bits']:.2%}, {per_kb:.1f} bits per KB; "
            f"projected {projected:,.0f}, measured/projected {saving / max(1.0, projected):.2f}) for "
            f"{learned['vector_bits']:,} bits of header: net {learned['vector_bits'] - saving:+,} bits. At this "
            f"saving per byte the vector breaks even at about {even:,.0f} KB of such text."
        )
    best = [_best_coding(r)["coding"] for r in runs]
    lines.append(f"- The coding with the smallest projected total, run by run: {'; '.join(best)}.")
    for key, name in (("per_group", "one scale per channel group"), ("per_channel_model", "per-channel scales")):
        gains = [p["single_gaussian"] - p[key] for r in runs for p in r.get("scale_hyperpriors", [])]
        if gains:
            lines.append(
                f"- Scale hyperprior, {name}: {min(gains):+,.0f} to {max(gains):+,.0f} bits against one Gaussian "
                "(positive: fewer bits)."
            )
    measured = {r["file"] for r in runs} | {r["file"] for r in autos}
    unmeasured = [
        p.relative_to(CORPUS).as_posix()
        for p in sorted(CORPUS.glob("*/*"))
        if p.stat().st_size >= AUTO_MIN_BYTES and p.relative_to(CORPUS).as_posix() not in measured
    ]
    if unmeasured:
        lines.append(
            "- Corpus files large enough for `auto` to train, not measured here: "
            f"{', '.join(unmeasured)} (on binary data `auto` stops before training when the model codes the window "
            "no better than zstd)."
        )
    return lines


def _auto_choice(r: dict) -> str:
    """What ``--steer auto`` makes of a stored run (the same rule as ``steering.select.choose``)."""
    if r["bytes"] < AUTO_MIN_BYTES:
        return "none (input under the threshold: nothing is trained)"
    none = next(row for row in r["modes"] if row["mode"] == "none")
    best = _best_coding(r)
    saving = none["projected_text_bits"] - (best["projected_total"] - best["vector_bits"])
    if not clears_margin(saving, best["vector_bits"]):
        return (
            f"none (projected saving {saving:,.0f} bits, under {AUTO_MARGIN:g}x the {best['vector_bits']:,}-bit vector)"
        )
    return f"{best['coding']} (projected saving {saving:,.0f} bits for a {best['vector_bits']:,}-bit vector)"


def _text_bits(row: dict, none: dict) -> tuple[float, str]:
    """A mode's text bits: measured, or projected: none's measured bits plus the held-out difference (the
    held-out rows' absolute bits, under the float model without the history mixer, are not the archive's)."""
    if "measured_text_bits" in row:
        return row["measured_text_bits"], "measured" + (" (another run, same bytes)" if "borrowed_from" in row else "")
    if "measured_text_bits" in none:
        return none["measured_text_bits"] + row["projected_text_bits"] - none["projected_text_bits"], "projected"
    return row["projected_text_bits"], "projected"


def _verdict(r: dict) -> list[str]:
    """The projection checked against the measured archives, and what ``auto`` picks here."""
    out = []
    if found := _savings(r):
        none, learned, measured, projected = found
        difference = 8 * (learned["archive_bytes"] - none["archive_bytes"])
        out.append(
            f"Projection check: the learned prompt was projected to save {projected:,.0f} text bits and saved "
            f"{measured:,.0f} ({measured / max(1.0, projected):.0%} of the projection); with its "
            f"{learned['vector_bits']:,}-bit vector the archive is {difference:+,} "
            "bits against none."
        )
    if not r.get("auto_applies", True):
        return [*out, f"(`--steer auto` learns {AUTO_TOKENS} token; this run shows what more tokens would do.)"]
    out.append(
        f"`--steer auto` here, with today's rules (a vector only on inputs of at least {AUTO_MIN_BYTES:,} "
        f"bytes, kept when its projected saving is at least {AUTO_MARGIN:g}x its bits): **{_auto_choice(r)}**."
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run")
    p.add_argument("--name", required=True, help="results name (steering-...)")
    p.add_argument("--file", required=True, help="a corpus file, relative to ../shared/corpus")
    p.add_argument("--bytes", type=int, default=1_000_000)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--tokens", type=int, default=1, help="N of learn:N")
    p.add_argument("--text", default="This is Wikipedia html", help="the fixed string of text:STRING")
    p.add_argument("--random-tokens", type=int, default=8, help="N of the static random:N prompt")
    p.add_argument("--model", help="default: the default model (a tiny test model makes a quick dry run)")
    p.add_argument("--measure", nargs="*", default=["none", "learned"], choices=STUDY_MODES)
    p.set_defaults(func=run)
    p = sub.add_parser("auto")
    p.add_argument("--name", required=True, help="results name (auto-...)")
    p.add_argument("--file", required=True, help="a corpus file, relative to ../shared/corpus")
    p.add_argument("--slices", type=int, nargs="*", default=[], help="offsets of 128 KiB slices to measure")
    p.add_argument("--as-if-long", action="store_true", help="decide as on an input of AUTO_MIN_BYTES or more")
    p.add_argument("--model")
    p.set_defaults(func=auto)
    p = sub.add_parser("curve")
    p.add_argument("--name", required=True, help="results name (curve-...)")
    p.add_argument("--file", required=True, help="a corpus file, relative to ../shared/corpus")
    p.add_argument("--bytes", type=int, default=2 * 1024 * 1024, help="the first window (default: 64 x 32 KiB)")
    p.add_argument("--model")
    p.set_defaults(func=curve)

    p = sub.add_parser("hyperpriors")
    p.add_argument("--name", required=True)
    p.add_argument("--model")
    p.set_defaults(func=hyperpriors)
    p = sub.add_parser("report")
    p.add_argument("--write", help="write the report to this file (default: print it)")
    p.set_defaults(func=report)
    args = parser.parse_args()
    if args.command in ("run", "auto", "curve") and not (CORPUS / args.file).exists():
        raise SystemExit(f"{CORPUS / args.file}: not found (the shared corpus is needed for the report)")
    args.func(args)


if __name__ == "__main__":
    main()
