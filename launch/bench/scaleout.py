"""f. Scale out: bytes exchanged between data-parallel ranks per optimizer step (replicated vs sharded stores vs a
dense adapter's all-reduce), and the NVMe tier's read/write GB/s (``scaleout_nvme.py``).

Two ranks on CPU (``torch.distributed.run``, gloo) run ``scaleout_driver.py`` once per variant (``VARIANTS``) and
report ``meft_ds.stats``' ``bytes_between_ranks``; ``formulas.py`` gives the dense side, checks the sharded forward's
measured bytes and extrapolates to 4 and 8 ranks. Both parts train the context's model on its text (the real SmolLM2
and ``facts`` text in a run, a tiny model in tests), adapters on its last ``ADAPTER_LAYERS`` layers.
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
from bench import common, formulas, plots, scaleout_nvme
from bench.common import GB, MB, Context, Section, fmt_bytes, fmt_ratio, section, text
from meft_ds.config import merge_settings
from meft_ds.models import is_builtin_model
from meft_ds.training import free_port

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("scaleout_driver.py")
RANKS = 2
MICRO_STEPS = 2  # micro-batches per optimizer step (per rank)
MAX_STEPS = 2  # optimizer steps per variant (fewer if Settings.train_steps is smaller)
SIMULATED_RANKS = (2, 4, 8)  # the sharded store's bytes by formula, from the 2-rank measurement
ADAPTER_LAYERS = 4  # the last layers of the model
BUILTIN = "SmolLM2-135M-Instruct (real weights, real text)"  # the model of a run (tests put a tiny one in the context)
VARIANTS = [
    {"name": "replicated", "store": {"shard": False}},
    {"name": "sharded", "store": {}},  # the default on a node of several ranks ("auto")
    {"name": "sharded, bf16 rows", "store": {}, "meft": {"row_dtype": "bf16"}},
]


def adapter_layers(total: int) -> list[int]:
    return list(range(max(0, total - ADAPTER_LAYERS), total))


# ----------------------------------------------------------------------------------------------------------------
# part 1: bytes between ranks


def run_ranks(spec: dict[str, Any], workdir: Path, timeout: float = 1200) -> list[dict[str, Any]]:
    """Run the driver on ``RANKS`` processes (this package and meft_ds importable); every rank's JSON, in rank order."""
    (workdir / "spec.json").write_text(json.dumps(spec, indent=1))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(RANKS), "--master_port",
               str(free_port()), str(DRIVER), str(workdir / "spec.json")]  # fmt: skip
    print(f"  {shlex.join(command)}", flush=True)
    paths = [str(ROOT), str(ROOT / "launch"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {"PYTHONPATH": os.pathsep.join(paths), "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    common.run_process(command, ROOT, timeout, **env)
    return [json.loads((Path(spec["out"]) / f"rank_{rank}.json").read_text()) for rank in range(RANKS)]


def summarize_variant(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-rank, per-optimizer-step means (over ranks and steps) of one variant's counters."""
    first = per_rank[0]
    layers, dim, neurons = len(first["layers"]), first["dim"], first["num_neurons"]
    steps = [step for rank in per_rank for step in rank["steps"]]

    def mean(key: str, part: str | None = None) -> float:
        return statistics.fmean(step[part][key] if part else step[key] for step in steps)

    summary = {
        "variant": first["variant"],
        "layers": layers,
        "dim": dim,
        "neurons": neurons,
        "experts": first["num_experts"],
        "touched": mean("touched"),
        "foreign": mean("foreign"),
        "updated": mean("rows_updated", "step"),
        "exchange": mean("bytes_between_ranks", "step"),
        "forward": mean("bytes_between_ranks", "micro"),
        "routers": first["router_params"] * formulas.GRAD_BYTES,  # the engine all-reduces the routers' fp32 gradients
        "dense": formulas.dense_allreduce_bytes(neurons, dim, layers),
        "fetched": mean("rows_fetched", "micro") / MICRO_STEPS,
        "row_dtype": first["row_dtype"],
        "node_pss": sum(r["pss_bytes"] for r in per_rank),
        "store_bytes": statistics.fmean(r["store_bytes"] for r in per_rank),
        "shard_default": first["shard_default"],
    }
    summary["total"] = summary["exchange"] + summary["forward"] + summary["routers"]
    return summary


def by_formula(variants: list[dict[str, Any]], tokens: int, config: meft_ds.MeftConfig) -> list[dict[str, Any]]:
    """The sharded variants' forward bytes by formula (``forward_formula``, to check against the measured ones), and
    the bytes a rank sends per optimizer step at ``SIMULATED_RANKS`` ranks, from its 2-rank quantities, with the
    dense adapter's ring all-reduce (fp32 and bf16) beside them."""
    loads = {}
    for v in variants:
        if v["forward"]:  # sharded
            travel = 2 if v["row_dtype"] in ("bf16", "fp16") else 4  # hidden states' and rows' bytes (fp32 compute)
            load = formulas.RankLoad(tokens, MICRO_STEPS, v["layers"], v["fetched"], v["touched"], v["dim"],
                                     config.n_probe, config.expert_size, travel, travel)  # fmt: skip
            loads[v["variant"]] = load
            v["forward_formula"] = formulas.sharded_forward_put_in(load, RANKS)
    rows, first = [], variants[0]
    for world in SIMULATED_RANKS:
        dense = formulas.dense_sent(first["neurons"], first["dim"], first["layers"], world)
        for variant, load in loads.items():
            parts = formulas.sharded_sent(load, world)
            rows.append({
                "world": world, "variant": variant, "parts": parts, "total": sum(parts.values()),
                "dense": dense, "dense_bf16": dense / 2,
            })  # fmt: skip
    return rows


def measure_between_ranks(context: Context, values: dict[str, Any], notes: list[str]) -> dict[str, Any] | None:
    """The ``VARIANTS`` on ``RANKS`` ranks with meft settings ``values``; None (and a note) if memory is short."""
    s, base = context.settings, context.base()
    steps = max(1, min(MAX_STEPS, s.train_steps))
    config = meft_ds.MeftConfig.from_dict(values)
    replicated = 3 * len(values["layers"]) * s.step_neurons * 2 * base.config.hidden_size * 4  # rows, 2 moments, fp32
    model_bytes = 4 * sum(p.numel() for p in base.parameters())
    if not common.fits_in_memory(RANKS * (2 * replicated + 2 * model_bytes) + GB, f"the {RANKS}-rank run", notes):
        return None
    batches = context.batches()
    tokens = batches[0]["input_ids"].numel()
    with tempfile.TemporaryDirectory(prefix="meft_bench_f_") as folder:
        workdir, model = Path(folder), "builtin"
        if not is_builtin_model(base):
            model = str(workdir / "model")
            base.save_pretrained(model)
        torch.save(batches, workdir / "batches.pt")
        spec = {"model": model, "batches": str(workdir / "batches.pt"), "steps": steps, "micro_steps": MICRO_STEPS,
                "lr": s.train_lr, "meft": config.to_dict()}  # fmt: skip
        # each variant in processes of its own, so that each one's memory is its own; or all in one launch (tests)
        launches = [[variant] for variant in VARIANTS] if s.scaleout_launch_per_variant else [VARIANTS]
        runs = [
            run_ranks({**spec, "variants": variants, "out": str(workdir / f"out_{index}")}, workdir)
            for index, variants in enumerate(launches)
        ]
    ranks = [{**rank, "variants": [v for run in runs for v in run[rank["rank"]]["variants"]]} for rank in runs[0]]
    variants = [summarize_variant([rank["variants"][i] for rank in ranks]) for i in range(len(VARIANTS))]
    simulated = by_formula(variants, tokens, config)
    return {"variants": variants, "simulated": simulated, "ranks": ranks, "steps": steps, "micro_steps": MICRO_STEPS,
            "tokens": tokens, "threads": ranks[0]["threads"], "meft": spec["meft"]}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# the section


def table_rows(between: dict[str, Any]) -> list[list[Any]]:
    """Bytes between ranks per optimizer step (the dense adapter's all-reduce, each variant measured, then sent at 2,
    4 and 8 ranks by formula) and the node's memory per variant."""
    first = between["variants"][0]
    dense = first["dense"]
    rows = [["between ranks", f"dense adapter r={first['neurons']} (analytic, fp32 all-reduce)", "all",
             fmt_bytes(dense), f"{first['layers']} x 2 r d x 4 B", "", "1.00x"]]  # fmt: skip
    for v in between["variants"]:
        spread = f" ({v['foreign'] / v['touched']:.0%} of the rows to the other rank)" if v["foreign"] else ""
        forward = f" + forward {fmt_bytes(v['forward'])}" if v["forward"] else ""
        breakdown = f"exchange {fmt_bytes(v['exchange'])}{spread} + routers {fmt_bytes(v['routers'])}{forward}"
        rows.append(["between ranks", f"MEFT {v['variant']} (measured)",
                     f"{v['touched']:.0f} touched, {v['updated']:.0f} updated", fmt_bytes(v["total"]), breakdown, "",
                     fmt_ratio(dense / v["total"])])  # fmt: skip
    for row in between["simulated"]:
        parts = " + ".join(f"{name} {fmt_bytes(value)}" for name, value in row["parts"].items())
        rows.append([
            f"sent, {row['world']} ranks (formula)", f"MEFT {row['variant']}", "", fmt_bytes(row["total"]),
            f"{parts}; dense all-reduce {fmt_bytes(row['dense'])} fp32, "
            f"{fmt_bytes(row['dense_bf16'])} bf16", "", fmt_ratio(row["dense"] / row["total"]),
        ])  # fmt: skip
    return rows + [
        [f"memory per node ({RANKS} ranks)", f"MEFT {v['variant']}" + (" (the default)" if v["shard_default"] else ""),
         "", fmt_bytes(v["node_pss"]), f"stores {fmt_bytes(v['store_bytes'])} per rank (rows, moments)", "", ""]
        for v in between["variants"]
    ]  # fmt: skip


def run(context: Context) -> Section:
    s, notes, own = context.settings, [], context.model is not None and not is_builtin_model(context.model)
    model = f"the context's model ({type(context.model).__name__})" if own else BUILTIN
    values = {"s": s, "ranks": RANKS, "model": model, "layers": ADAPTER_LAYERS}
    layers = adapter_layers(context.base().config.num_hidden_layers)
    meft = merge_settings({"num_neurons": s.step_neurons, "top_k": s.top_k, "layers": layers}, context.overrides)
    between = measure_between_ranks(context, meft, notes)
    nvme = scaleout_nvme.measure(context, meft, notes)
    how, verdict, rows = [], [text("f", "skipped")], []
    sizes = between["variants"] if between is not None else []
    if between is not None:
        checked = ", ".join(text("f", "checked", v=v) for v in sizes if "forward_formula" in v)
        how = [text("f", "how", **values, b=between, v=sizes[0], checked=checked)]
        named = [text("f", "size", v=v, ratio=v["dense"] / v["total"]) for v in sizes]
        verdict = [text("f", "verdict", sizes=", ".join(named), dense=sizes[0]["dense"])]
        verdict += [text("f", "forward", v=v, ranks=RANKS) for v in sizes if v["forward"]]
        widest = [row for row in between["simulated"] if row["world"] == SIMULATED_RANKS[-1]]
        verdict += [text("f", "at_most", row=row) for row in widest]
        memory = ", ".join(f"{v['variant']} {fmt_bytes(v['node_pss'])}" for v in sizes)
        verdict.append(text("f", "memory", ranks=RANKS, memory=memory))
        rows = table_rows(between)
    if nvme is not None:
        how.append(scaleout_nvme.text(nvme, "how"))
        verdict.append(scaleout_nvme.text(nvme, "verdict"))
        rows += scaleout_nvme.rows(nvme)
    return section(
        "f",
        values,
        how=" ".join(how) or text("f", "nothing"),
        rows=rows,
        met=all(v["total"] < v["dense"] for v in sizes) if sizes else None,
        verdict=" ".join(verdict),
        notes=notes,
        data={"between_ranks": between, "nvme": nvme, "model": values["model"]},
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
            heights = [v[part] / MB for v in variants]
            left.bar(range(1, len(variants) + 1), heights, bottom=bottom, color=color, label=part)
            bottom = [b + x for b, x in zip(bottom, heights, strict=True)]
        left.set_xticks(range(len(labels)), labels)
        left.set_ylabel("MB per rank per optimizer step")
        left.legend(fontsize=8)
    else:
        left.text(0.5, 0.5, "2-rank run skipped", ha="center")
    left.set_title("f. Bytes between ranks per optimizer step")
    scaleout_nvme.plot(right, nvme)
    right.set_title("f. NVMe tier read / write GB/s")
    plots.save(figure, section, path, bottom=0.33)
