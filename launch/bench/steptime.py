"""c. Training step time on this CPU: MEFT vs LoRA vs dense parallel adapters, same model, batch and precision; then
a host timeline of MEFT's micro-steps (``bench/timeline.py``) beside the one measured before issue 16's changes
(``docs/bench/c_timeline_before.json``)."""

from __future__ import annotations

import functools
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import meft_ds
from bench import common, plots, timeline
from bench.common import GB, Context, Section, fmt_ratio, section, text
from bench.report import this_cpu
from meft_ds.baselines import LoraTargets, add_dense_adapters, add_lora
from meft_ds.memory import store_bytes

# steps before timing: a MEFT step is slower while its store is first touched, and with freed host memory kept
# (launch/bench.py) the heap grows during the first few steps
WARMUP = 4
TIMELINE_STEPS = 3
BASELINE = Path(__file__).resolve().parents[2] / "docs" / "bench" / "c_timeline_before.json"

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_variants(context: Context) -> list[tuple[str, Callable[[], tuple[nn.Module, list[Any]]], float]]:
    """(label, builder, memory it needs) per variant; a builder returns the model and its optimizers."""
    s = context.settings
    r = s.step_neurons
    config = context.base().config
    layers, dim, tokens = config.num_hidden_layers, config.hidden_size, s.micro_batch * s.seq_len
    overhead = 1.5 * GB  # a model copy, the base model's activations
    # MEFT: rows, two moments, at worst a full gradient accumulator (fp32); dense: K, V, grads, Adam moments (the same
    # 4 x 2 r d per layer), and T x r activations
    store = store_bytes(layers, r, dim)
    dense = store + 3 * tokens * r * layers * 4

    def lora(targets: list[str]) -> tuple[nn.Module, list[Any]]:
        model = add_lora(context.fresh_model(), s.lora_rank, LoraTargets(targets))
        return model, [torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)]

    def meft() -> tuple[nn.Module, list[Any]]:
        config = context.meft({"num_neurons": r, "top_k": s.top_k})
        return common.build_meft(context.fresh_model(), config, 1e-4)

    def dense_adapter(neurons: int) -> tuple[nn.Module, list[Any]]:
        model = context.fresh_model()
        return model, [torch.optim.AdamW(add_dense_adapters(model, neurons), lr=1e-4, fused=True)]

    return [
        (f"LoRA r={s.lora_rank} on q,v (peft)", functools.partial(lora, ["q_proj", "v_proj"]), overhead),
        (f"LoRA r={s.lora_rank} on all linear (peft)", functools.partial(lora, ALL_LINEAR), overhead),
        (f"MEFT r={r}, K={s.top_k}", meft, store + overhead),
        (f"dense adapter r={r}", functools.partial(dense_adapter, r), dense + overhead),
        (f"dense adapter r={s.top_k} (= K)", functools.partial(dense_adapter, s.top_k), overhead),
    ]


def trainable(model: nn.Module) -> int:
    """Trainable elements: the parameters that take gradients, and MEFT's rows (a row store's, not parameters)."""
    rows = sum(a.store.rows.numel() for a in meft_ds.adapters(model))
    return sum(p.numel() for p in model.parameters() if p.requires_grad) + rows


def run(context: Context) -> Section:
    s = context.settings
    variants = build_variants(context)
    lora, lora_all, meft, dense, dense_k = variants
    rounds = 3 * s.step_repeats  # the target's pair: 9 rounds (a LoRA step's time varies by ~10% from one to the next)
    measured: dict[str, dict[str, Any]] = {}
    skipped: list[str] = []
    host = None
    # LoRA on q,v and MEFT held at once and timed in turns (the target's comparison); then the others one at a time
    singles = [([variant], s.step_repeats) for variant in (lora_all, dense, dense_k)]
    for group, repeats in [([lora, meft], rounds), *singles]:
        models, needed = {}, 0.0
        for label, build, memory in group:
            needed += memory  # a group's models are held at once
            if common.fits_in_memory(needed, label, skipped):
                models[label] = build()
        if not models:  # none fits in memory
            continue
        steps = {k: common.step_function(model, opt, context.batch) for k, (model, opt) in models.items()}
        print(f"  {' and '.join(models)}: {WARMUP} warm-up steps each, then {repeats} timed in turns")
        for label, times in common.alternating_seconds(steps, repeats, WARMUP).items():
            measured[label] = {"variant": label, "seconds": statistics.median(times), "times": times}
            measured[label]["trainable"] = trainable(models[label][0])
            print(f"    {label}: median {measured[label]['seconds']:.2f} s ({', '.join(f'{t:.2f}' for t in times)})")
        if meft[0] in models:  # where MEFT's host time goes
            host = {"seconds": timeline.timed_steps(steps[meft[0]], TIMELINE_STEPS), "steps": TIMELINE_STEPS}
            host["layers"] = len(meft_ds.adapters(models[meft[0]][0]))
        del models, steps  # nothing of a group outlives it
        common.free_memory()
    lora_time, meft_time, dense_time = (measured.get(v[0], {}).get("seconds") for v in (lora, meft, dense))
    in_order = [measured[label] for label, _, _ in variants if label in measured]
    ratio = (lambda m: fmt_ratio(m["seconds"] / meft_time)) if meft_time else (lambda m: "-")
    table = [[m["variant"], f"{m['trainable']:,}", f"{m['seconds']:.2f}", ratio(m)] for m in in_order]
    values = {"s": s, "alpha": 2 * s.lora_rank, "warmup": WARMUP, "rounds": rounds, "cpu": this_cpu()}
    values |= {"threads": torch.get_num_threads(), "timeline_steps": TIMELINE_STEPS}
    values["memory"] = text("c", "memory_kept" if context.kept_freed_memory else "memory_default")
    data = {"measured": in_order, "host": host, "extra_tables": host_tables(host, s.step_neurons), "cpu": this_cpu()}
    if not (meft_time and lora_time and dense_time):  # a variant was skipped (it did not fit in memory)
        return section("c", values, rows=table, met=None, verdict=text("c", "not_judged"), notes=skipped, data=data)
    values |= {"vs_lora": meft_time / lora_time, "vs_dense": dense_time / meft_time}
    met = values["vs_lora"] <= 1.2 and values["vs_dense"] >= 2
    return section("c", values, rows=table, met=met, notes=skipped, data=data)


def host_tables(host: dict[str, Any] | None, neurons: int) -> list[dict[str, Any]]:
    """The host timeline as a table, beside the baseline measured on this CPU at this size, where there is one
    (``BASELINE`` holds one record per CPU; not for another size, e.g. ``--quick``)."""
    if host is None:
        return []
    records = json.loads(BASELINE.read_text()) if BASELINE.is_file() else []
    baseline = next((b for b in records if b.get("cpu") == this_cpu() and b.get("neurons") == neurons), None)
    table = timeline.table(host, baseline)
    title = text("c", "timeline", neurons=neurons, layers=host["layers"])
    if baseline is not None:
        title += text("c", "timeline_before", b=baseline)
    return [{"title": title, "columns": table[0], "rows": table[1:]}]


def plot(section: Section, path: str) -> None:
    title = f"c. Step time, SmolLM2-135M fp32, micro-batch 2 x 256, {section.data.get('cpu', '?')}"
    with plots.chart(
        section, path, title=title, xlabel="seconds per training step (median)", margins={"left": 0.3}
    ) as axes:
        seconds = [m["seconds"] for m in section.data["measured"]]
        labels = [m["variant"] for m in section.data["measured"]]
        plots.labelled_barh(axes, labels, seconds, [f" {s:.2f} s" for s in seconds], color="tab:blue")
