"""f. Scale out: bytes exchanged between data-parallel ranks per optimizer step (replicated vs sharded stores vs a
dense adapter's all-reduce), and the NVMe tier's read/write GB/s (``scaleout_nvme.py``).

Two ranks on CPU (``torch.distributed.run``, gloo) run ``scaleout_driver.py`` once per variant (``VARIANTS``) and
report ``meft_ds.stats``' ``bytes_between_ranks``; ``formulas.py`` gives the dense side, checks the sharded forward's
measured bytes and extrapolates to 4 and 8 ranks. The model: ``scaleout_plan.py``.
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

import meft_ds
from bench import common, formulas, plots
from bench.common import GB, MB, Context, Section, fmt_bytes, fmt_ratio, section, text
from bench.scaleout_nvme import measure_nvme, nvme_how, nvme_plot, nvme_rows, nvme_verdict
from bench.scaleout_plan import ADAPTER_LAYERS, adapter_layers, model_plan, num_layers, plan_batches, plan_dim

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("scaleout_driver.py")
RANKS = 2
MICRO_STEPS = 2  # micro-batches per optimizer step (per rank)
MAX_STEPS = 2  # optimizer steps per variant (fewer if Settings.train_steps is smaller)
SIMULATED_RANKS = (2, 4, 8)  # the sharded store's bytes by formula, from the 2-rank measurement
VARIANTS = [
    {"name": "replicated", "store": {"shard": False}},
    {"name": "sharded", "store": {}},  # the default on a node of several ranks ("auto")
    {"name": "sharded, bf16 rows", "store": {}, "meft": {"row_dtype": "bf16"}},
]


# ----------------------------------------------------------------------------------------------------------------
# part 1: bytes between ranks


def run_ranks(spec: dict[str, Any], workdir: Path, timeout: float = 1200) -> list[dict[str, Any]]:
    """Run the driver on ``RANKS`` processes (this package and meft_ds importable); every rank's JSON, in rank order."""
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(RANKS), "--master_port",
        str(common.free_port()), str(DRIVER), str(spec_path),
    ]  # fmt: skip
    print(f"  {shlex.join(command)}", flush=True)
    paths = [str(ROOT), str(ROOT / "launch"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    accelerator = os.environ.get("DS_ACCELERATOR", "cpu")
    common.run_process(command, ROOT, timeout, PYTHONPATH=os.pathsep.join(paths), DS_ACCELERATOR=accelerator)
    return [json.loads((Path(spec["out"]) / f"rank_{rank}.json").read_text()) for rank in range(RANKS)]


def summarize_variant(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-rank, per-optimizer-step means (over ranks and steps) of one variant's counters."""
    first = per_rank[0]
    layers, dim, neurons = len(first["layers"]), first["dim"], first["num_neurons"]
    steps = [step for rank in per_rank for step in rank["steps"]]
    routers = first["router_params"] * formulas.GRAD_BYTES  # the engine all-reduces the routers' fp32 gradients
    mean = statistics.fmean
    summary = {
        "variant": first["variant"],
        "layers": layers,
        "dim": dim,
        "neurons": neurons,
        "experts": first["num_experts"],
        "rows_held": statistics.fmean(r["rows_held"] for r in per_rank),
        "touched": mean([s["touched"] for s in steps]),
        "foreign": mean([s["foreign"] for s in steps]),
        "updated": mean([s["step"]["rows_updated"] for s in steps]),
        "exchange": mean([s["step"]["bytes_between_ranks"] for s in steps]),
        "forward": mean([s["micro"]["bytes_between_ranks"] for s in steps]),
        "routers": routers,
        "seconds": mean([s["seconds"] for s in steps]),
        "dense": formulas.dense_allreduce_bytes(neurons, dim, layers),
        "per_rank_counted": [
            sum(s["micro"]["bytes_between_ranks"] + s["step"]["bytes_between_ranks"] for s in r["steps"])
            for r in per_rank
        ],
        "per_rank_final": [r["final"]["bytes_between_ranks"] for r in per_rank],
        "fetched": mean([s["micro"]["rows_fetched"] for s in steps]) / MICRO_STEPS,
        "row_dtype": first.get("row_dtype", "auto"),
        "node_pss": sum(r["pss_bytes"] for r in per_rank),
        "store_bytes": statistics.fmean(r["store_bytes"] for r in per_rank),
        "shard_default": first.get("shard_default", False),
    }
    summary["total"] = summary["exchange"] + summary["forward"] + summary["routers"]
    return summary


def rank_load(variant: dict[str, Any], *, tokens: int, config: meft_ds.MeftConfig) -> dict[str, Any]:
    """A rank's measured quantities (:class:`RankLoad`) in one variant."""
    travel = 2 if variant["row_dtype"] in ("bf16", "fp16") else 4  # the runs compute in fp32
    return {
        "tokens": tokens, "micro_steps": MICRO_STEPS, "layers": variant["layers"], "fetched": variant["fetched"],
        "touched": variant["touched"], "dim": variant["dim"], "n_probe": config.n_probe,
        "expert_size": config.expert_size, "hidden_bytes": travel, "row_bytes": travel,
    }  # fmt: skip


def simulate(variants: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Bytes a rank sends per optimizer step at ``SIMULATED_RANKS`` ranks: the sharded variants by formula from
    their 2-rank quantities, before and after issue 15, and the dense adapter's ring all-reduce (fp32 and bf16)."""
    first = variants[0]
    rows = []
    for world in SIMULATED_RANKS:
        dense = formulas.dense_sent(first["neurons"], first["dim"], first["layers"], world)
        for v in variants:
            if "load" not in v:
                continue
            load = formulas.RankLoad(**v["load"])
            parts = formulas.sharded_sent(load, world)
            rows.append({
                "world": world, "variant": v["variant"], "parts": parts, "total": sum(parts.values()),
                "before": formulas.sharded_sent_before(load, world), "dense": dense, "dense_bf16": dense / 2,
            })  # fmt: skip
    return rows


def measure_between_ranks(context: Context, plan: dict[str, Any], notes: list[str]) -> dict[str, Any] | None:
    s = context.settings
    steps = max(1, min(MAX_STEPS, s.train_steps))
    layers = adapter_layers(num_layers(context, plan))
    base = {"num_neurons": s.step_neurons, "top_k": s.top_k, "layers": layers}
    config = meft_ds.MeftConfig.from_dict({**base, **context.overrides})
    meft = config.to_dict()
    replicated = 3 * len(layers) * s.step_neurons * 2 * plan_dim(context, plan) * 4  # rows, 2 moments, fp32, per rank
    model_bytes = 4 * 135_000_000  # SmolLM2-135M in fp32, at most (the random and test models are smaller)
    if plan["source"] == "context":
        model_bytes = 4 * sum(p.numel() for p in context.base().parameters())
    elif isinstance(plan["source"], dict):
        model_bytes = 4 * 45_000_000  # the random 4-layer model: about 42M parameters, 28M of them embeddings
    if not common.fits_in_memory(RANKS * (2 * replicated + 2 * model_bytes) + GB, f"the {RANKS}-rank run", notes):
        return None
    batches = plan_batches(context, plan, steps * MICRO_STEPS * RANKS)
    tokens = batches[0]["input_ids"].numel()
    with tempfile.TemporaryDirectory(prefix="meft_bench_f_") as folder:
        workdir = Path(folder)
        source = plan["source"]
        if source == "context":
            context.base().save_pretrained(workdir / "model")
            source = str(workdir / "model")
        torch.save(batches, workdir / "batches.pt")
        spec = {"model": source, "batches": str(workdir / "batches.pt"), "steps": steps, "micro_steps": MICRO_STEPS}
        spec |= {"lr": s.train_lr, "meft": meft}
        # each variant in processes of its own, so that each one's memory is its own; or all in one launch (tests)
        launches = [[variant] for variant in VARIANTS] if s.scaleout_launch_per_variant else [VARIANTS]
        runs = [
            run_ranks({**spec, "variants": variants, "out": str(workdir / f"out_{index}")}, workdir)
            for index, variants in enumerate(launches)
        ]
    ranks = [{**rank, "variants": [v for run in runs for v in run[rank["rank"]]["variants"]]} for rank in runs[0]]
    variants = [summarize_variant([rank["variants"][i] for rank in ranks]) for i in range(len(VARIANTS))]
    for v in variants:
        if v["forward"]:  # sharded: the formula of the forward's bytes, from this run's own quantities
            v["load"] = rank_load(v, tokens=tokens, config=config)
            v["forward_formula"] = formulas.sharded_forward_put_in(formulas.RankLoad(**v["load"]), RANKS)
        print(f"  {v['variant']}: {v['touched']:.0f} rows touched/step/rank, {fmt_bytes(v['total'])} between ranks "
              f"per step per rank (dense {fmt_bytes(v['dense'])})")  # fmt: skip
    return {
        "variants": variants,
        "simulated": simulate(variants),
        "ranks": ranks,
        "steps": steps,
        "micro_steps": MICRO_STEPS,
        "tokens": tokens,
        "layers": layers,
        "threads": ranks[0]["threads"],
        "meft": meft,
    }


# ----------------------------------------------------------------------------------------------------------------
# the section


def table_rows(between: dict[str, Any] | None, nvme: dict[str, Any] | None) -> list[list[Any]]:
    """Bytes between ranks per optimizer step (the dense adapter's all-reduce, each variant measured, then sent at 2,
    4 and 8 ranks by formula) and the node's memory per variant; then the NVMe tier's rows."""
    rows: list[list[Any]] = []
    if between is not None:
        first = between["variants"][0]
        dense = first["dense"]
        rows.append([
            "between ranks", f"dense adapter r={first['neurons']} (analytic, fp32 all-reduce)", "all",
            fmt_bytes(dense), f"{first['layers']} x 2 r d x 4 B", "", "1.00x",
        ])  # fmt: skip
        for v in between["variants"]:
            spread = f" ({v['foreign'] / v['touched']:.0%} of the rows to the other rank)" if v["foreign"] else ""
            forward = f" + forward {fmt_bytes(v['forward'])}" if v["forward"] else ""
            rows.append([
                "between ranks", f"MEFT {v['variant']} (measured)",
                f"{v['touched']:.0f} touched, {v['updated']:.0f} updated", fmt_bytes(v["total"]),
                f"exchange {fmt_bytes(v['exchange'])}{spread} + routers {fmt_bytes(v['routers'])}{forward}", "",
                fmt_ratio(dense / v["total"]),
            ])  # fmt: skip
        for row in between["simulated"]:
            parts = " + ".join(f"{name} {fmt_bytes(value)}" for name, value in row["parts"].items())
            rows.append([
                f"sent, {row['world']} ranks (formula)", f"MEFT {row['variant']}", "",
                fmt_bytes(row["total"]), f"{parts}; before issue 15 {fmt_bytes(row['before'])}; dense all-reduce "
                f"{fmt_bytes(row['dense'])} fp32, {fmt_bytes(row['dense_bf16'])} bf16", "",
                fmt_ratio(row["dense"] / row["total"]),
            ])  # fmt: skip
        rows += [
            [
                f"memory per node ({RANKS} ranks)",
                f"MEFT {v['variant']}" + (" (the default)" if v["shard_default"] else ""), "", fmt_bytes(v["node_pss"]),
                f"stores {fmt_bytes(v['store_bytes'])} per rank (rows, moments)", "", "",
            ]
            for v in between["variants"]
        ]  # fmt: skip
    return rows + (nvme_rows(nvme) if nvme is not None else [])


def run(context: Context) -> Section:
    s = context.settings
    notes: list[str] = []
    plan = model_plan(context)
    between = measure_between_ranks(context, plan, notes)
    nvme = measure_nvme(context, plan, notes)
    values = {"s": s, "ranks": RANKS, "model": plan["label"], "layers": ADAPTER_LAYERS}
    how, verdict = [], []
    sizes = between["variants"] if between is not None else []
    if between is not None:
        checked = [text("f", "checked", v=v) for v in sizes if "forward_formula" in v]
        how.append(text("f", "how", **values, b=between, v=sizes[0], checked=", ".join(checked)))
        named = [text("f", "size", v=v, ratio=v["dense"] / v["total"]) for v in sizes]
        verdict.append(text("f", "verdict", sizes=", ".join(named), dense=sizes[0]["dense"]))
        verdict += [text("f", "forward", v=v, ranks=RANKS) for v in sizes if v["forward"]]
        at_most = [row for row in between["simulated"] if row["world"] == max(SIMULATED_RANKS)]
        verdict += [text("f", "at_most", row=row) for row in at_most]
        memory = ", ".join(f"{v['variant']} {fmt_bytes(v['node_pss'])}" for v in sizes)
        verdict.append(text("f", "memory", ranks=RANKS, memory=memory))
    else:
        verdict.append(text("f", "skipped"))
    if nvme is not None:
        how.append(nvme_how(nvme))
        verdict.append(nvme_verdict(nvme))
    return section(
        "f",
        values,
        how=" ".join(how) or text("f", "nothing"),
        rows=table_rows(between, nvme),
        met=all(v["total"] < v["dense"] for v in sizes) if sizes else None,
        verdict=" ".join(verdict),
        notes=notes,
        data={"between_ranks": between, "nvme": nvme, "model": plan["label"]},
    )


def plot(section: Section, path: str) -> None:
    between, nvme = section.data["between_ranks"], section.data["nvme"]
    figure, (left, right) = plots.figure(12, 8, ncols=2)
    if between is not None:
        variants = between["variants"]
        labels = ["dense (analytic)"] + [f"MEFT {v['variant']}" for v in variants]
        left.bar([0], [variants[0]["dense"] / MB], color="gray")
        bottom = [0.0] * len(variants)
        for part, color in (("exchange", "tab:blue"), ("forward", "tab:orange"), ("routers", "tab:green")):
            values = [v[part] / MB for v in variants]
            left.bar(range(1, len(variants) + 1), values, bottom=bottom, color=color, label=part)
            bottom = [b + x for b, x in zip(bottom, values, strict=True)]
        left.set_xticks(range(len(labels)), labels)
        left.set_ylabel("MB per rank per optimizer step")
        left.legend(fontsize=8)
    else:
        left.text(0.5, 0.5, "2-rank run skipped", ha="center")
    left.set_title("f. Bytes between ranks per optimizer step")
    nvme_plot(right, nvme)
    right.set_title("f. NVMe tier read / write GB/s")
    plots.save(figure, section, path, bottom=0.33)
