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
from bench.report import this_cpu

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
            (meft_ds.for_inference if path == "device" else meft_ds.for_training)(model)
            before = meft_ds.stats(model)
            elapsed, cpu_share, output = timed_generate(model, batch, pad)
            outputs.append(output)
            if repeat:
                timed[path].append((elapsed, cpu_share, stats_delta(before, meft_ds.stats(model))))
            print(f"  {path}: {elapsed:.2f} s, CPU share {cpu_share:.2f}{'' if repeat else ' (warm-up)'}", flush=True)
    reference = outputs[0]  # the host path's warm-up
    prompt_length = batch["input_ids"].shape[1]
    base_output = timed_generate(context.base(), batch, pad)[2]
    answers = zip(reference[:, prompt_length:], base_output[:, prompt_length:], strict=True)
    measured = {}
    for path, calls in timed.items():
        times = [seconds for seconds, _, _ in calls]
        measured[path] = {"seconds": statistics.median(times), "times": times, "cpu_share": [c[1] for c in calls]}
        measured[path]["tokens_per_s"] = tokens / measured[path]["seconds"]
        for way in ("to_device", "to_host"):
            measured[path][f"{way}_per_token"] = sum(c[2][f"bytes_{way}"] for c in calls) / (tokens * repeats)
    host, device = measured["host"], measured["device"]
    data = {"measured": measured, "identical": all(torch.equal(o, reference) for o in outputs)}
    data |= {"changed_vs_base": sum(not torch.equal(adapted, base) for adapted, base in answers), "tokens": tokens}
    data |= {"prompts": reference.shape[0], "new_tokens": NEW_TOKENS, "meft": meft}
    data["device_bytes"] = sum(a.serving.nbytes for a in meft_ds.adapters(model) if a.serving is not None)
    data |= {"cpu": this_cpu(), "speedup": host["seconds"] / device["seconds"]}
    # each pair of calls ran back to back: their ratio is less exposed to other work on the machine than the medians
    data["paired_speedup"] = statistics.median(h / d for h, d in zip(host["times"], device["times"], strict=True))
    data["starved_calls"] = sum(share < STARVED for m in measured.values() for share in m["cpu_share"])
    threads = torch.get_num_threads()
    starved = text("g", "starved", **data, calls=2 * repeats, threads=threads, limit=STARVED)
    table = [
        [LABELS[path], f"{m['seconds']:.2f}", f"{m['tokens_per_s']:.1f}", fmt_ratio(host["seconds"] / m["seconds"]),
         fmt_bytes(m["to_device_per_token"]), fmt_bytes(m["to_host_per_token"])]
        for path, m in measured.items()
    ]  # fmt: skip
    silent = device["to_device_per_token"] == device["to_host_per_token"] == 0
    values = data | {"std": VALUE_STD, "repeats": repeats, "prompt_length": prompt_length, "threads": threads}
    values["identical"] = "yes" if data["identical"] else "NO"
    met = data["identical"] and silent and data["paired_speedup"] > 1.0
    return section("g", values, rows=table, met=met, notes=[starved] if data["starved_calls"] else [], data=data)


def plot(section: Section, path: str) -> None:
    measured = section.data["measured"]
    speeds = [measured[p]["tokens_per_s"] for p in PATHS]
    title = f"g. generate() speed, SmolLM2-135M fp32, {section.data['prompts']} prompts, this CPU"
    props = {"xlim": (0, 1.8 * max(speeds)), "xlabel": "generated tokens per second (median)", "title": title}
    margins = {"left": 0.32, "right": 0.97, "bottom": 0.3}
    with plots.chart(section, path, (9, 4.5), margins=margins, **props) as axes:  # xlim: room for the bars' texts
        texts = [
            f" {measured[p]['tokens_per_s']:.1f} tokens/s ({fmt_bytes(measured[p]['to_device_per_token'])} "
            "to the device per token)"
            for p in PATHS
        ]
        plots.labelled_barh(axes, [LABELS[p] for p in PATHS], speeds, texts, color=["tab:gray", "tab:blue"])
