"""g. Generation speed: ``generate()`` tokens/s with routing on the host (the training path) vs on the device
(``meft_ds.for_inference``), same model, prompts and random adapter values, outputs compared token for token."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import meft_ds
from bench import plots
from bench.common import Context, Section, fmt_bytes, fmt_ratio, section, stats_delta, text
from bench.report import cpu_brand

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = 8  # one batch of held-out facts questions
NEW_TOKENS = 32
VALUE_STD = 0.02  # the adapters' values: large enough to change answers, small enough to keep them sentences
PATHS = ("host", "device")
STARVED = 0.8  # a timed call whose process got less of its threads' wall time than this shared the CPU
LABELS = {"host": "routing on the host (training path)", "device": "routing on the device (for_inference)"}


def adapted_model(context: Context) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A fresh copy of the base model with the main job's adapters (``--meft`` overrides applied), values random."""
    main_job = json.loads((ROOT / "ds_configs" / "meft.json").read_text())["meft"]
    config = context.meft(main_job)
    model = meft_ds.inject(context.fresh_model(), config)
    generator = torch.Generator().manual_seed(0)
    for adapter in meft_ds.adapters(model):
        adapter.store.values.normal_(0.0, VALUE_STD, generator=generator)
    return model.eval(), config.to_dict()


def prompt_batch(context: Context) -> dict[str, torch.Tensor]:
    """The first held-out facts questions, formatted as in training, left-padded for batched generation."""
    from meft_ds.data import format_prompt, has_chat_template, load_examples

    tokenizer = context.tokenizer
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the last column
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompts = [format_prompt(tokenizer, e) for e in load_examples("facts", "eval", limit=PROMPTS)]
    special = not has_chat_template(tokenizer)
    batch = dict(tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=special))
    tokenizer.padding_side = side
    return batch


def timed_generate(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], pad: int
) -> tuple[float, float, torch.Tensor]:
    """Wall seconds, the share of its threads' wall time the process got on the CPU (below 1: other work on the
    machine took cores from it), and the output."""
    start, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        output = model.generate(
            **batch, do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=pad
        )
    wall = time.perf_counter() - start
    return wall, (time.process_time() - cpu) / (wall * torch.get_num_threads()), output


def use(model: torch.nn.Module, path: str) -> None:
    if path == "device":
        meft_ds.for_inference(model)
    else:
        meft_ds.for_training(model)


def run(context: Context) -> Section:
    repeats = 3 * context.settings.step_repeats - 2  # 7 in the full run
    context.base()
    model, meft = adapted_model(context)
    batch = prompt_batch(context)
    pad = context.tokenizer.pad_token_id
    tokens = batch["input_ids"].shape[0] * NEW_TOKENS
    timed: dict[str, list[tuple[float, float, dict[str, int]]]] = {path: [] for path in PATHS}
    outputs = []
    for repeat in range(repeats + 1):  # the first round is the warm-up
        for path in PATHS:
            use(model, path)
            before = meft_ds.stats(model)
            elapsed, cpu_share, output = timed_generate(model, batch, pad)
            outputs.append(output)
            if repeat:
                timed[path].append((elapsed, cpu_share, stats_delta(before, meft_ds.stats(model))))
            print(f"  {path}: {elapsed:.2f} s, CPU share {cpu_share:.2f}{'' if repeat else ' (warm-up)'}", flush=True)
    device_bytes = sum(a.serving.nbytes for a in meft_ds.adapters(model) if a.serving is not None)
    reference = outputs[0]  # the host path's warm-up
    identical = all(torch.equal(o, reference) for o in outputs)
    prompt_length = batch["input_ids"].shape[1]
    base_output = timed_generate(context.base(), batch, pad)[2]
    answers = zip(reference[:, prompt_length:], base_output[:, prompt_length:], strict=True)
    changed = sum(not torch.equal(adapted, base) for adapted, base in answers)
    measured = {}
    for path, calls in timed.items():
        times = [seconds for seconds, _, _ in calls]
        measured[path] = {"seconds": statistics.median(times), "times": times, "cpu_share": [c[1] for c in calls]}
        measured[path]["tokens_per_s"] = tokens / measured[path]["seconds"]
        for way in ("to_device", "to_host"):
            measured[path][f"{way}_per_token"] = sum(c[2][f"bytes_{way}"] for c in calls) / (tokens * repeats)
    speedup = measured["host"]["seconds"] / measured["device"]["seconds"]
    # each pair of calls ran back to back: their ratio is less exposed to other work on the machine than the medians
    paired = statistics.median(
        h / d for h, d in zip(measured["host"]["times"], measured["device"]["times"], strict=True)
    )
    starved = sum(share < STARVED for m in measured.values() for share in m["cpu_share"])
    notes = []
    if starved:
        notes.append(
            text("g", "starved", starved=starved, calls=2 * repeats, threads=torch.get_num_threads(), limit=STARVED)
        )
    silent = measured["device"]["to_device_per_token"] == measured["device"]["to_host_per_token"] == 0
    table = [
        [
            LABELS[path], f"{measured[path]['seconds']:.2f}", f"{measured[path]['tokens_per_s']:.1f}",
            fmt_ratio(measured["host"]["seconds"] / measured[path]["seconds"]),
            fmt_bytes(measured[path]["to_device_per_token"]), fmt_bytes(measured[path]["to_host_per_token"]),
        ]
        for path in PATHS
    ]  # fmt: skip
    cpu, prompts = cpu_brand(), reference.shape[0]
    values = {"cpu": cpu, "meft": meft, "std": VALUE_STD, "changed": changed, "prompts": prompts, "new": NEW_TOKENS}
    values |= {"repeats": repeats, "tokens": tokens, "prompt_length": prompt_length, "device_bytes": device_bytes}
    values |= {"threads": torch.get_num_threads(), "identical": "yes" if identical else "NO", "m": measured}
    values |= {"speedup": speedup, "paired": paired}
    return section(
        "g", values, rows=table, met=identical and silent and paired > 1.0, notes=notes,
        data={
            "measured": measured, "identical": identical, "changed_vs_base": changed, "tokens": tokens,
            "prompts": prompts, "new_tokens": NEW_TOKENS, "meft": meft, "device_bytes": device_bytes,
            "cpu": cpu, "speedup": speedup, "paired_speedup": paired, "starved_calls": starved,
        },
    )  # fmt: skip


def plot(section: Section, path: str) -> None:
    measured = section.data["measured"]
    figure, axes = plots.figure(9, 4.5)
    speeds = [measured[p]["tokens_per_s"] for p in PATHS]
    texts = [
        f" {measured[p]['tokens_per_s']:.1f} tokens/s ({fmt_bytes(measured[p]['to_device_per_token'])} "
        "to the device per token)"
        for p in PATHS
    ]
    plots.labelled_barh(axes, [LABELS[p] for p in PATHS], speeds, texts, color=["tab:gray", "tab:blue"])
    axes.set_xlim(0, 1.8 * max(speeds))  # room for the labels
    axes.set_xlabel("generated tokens per second (median)")
    axes.set_title(f"g. generate() speed, SmolLM2-135M fp32, {section.data['prompts']} prompts, this CPU")
    plots.save(figure, section, path, left=0.32, right=0.97, bottom=0.3)
