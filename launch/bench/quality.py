"""quality. Learning quality at a device budget: held-out EM on new facts and knowledge retained, MEFT vs LoRA vs the
dense parallel adapter, every run a ``launch/train.py --method ...`` process with the same data, steps and DeepSpeed
config; device bytes as the launcher reports them (meft_ds/plan.py). Each configuration ("cell") runs a small
learning-rate sweep; its best learning rate (by held-out EM, mean over seeds) is its result.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import common, plots
from bench.common import MB, Context, Section, run_process
from bench.quality_grid import Cell, Grid, capacity_grid, full_grid, headline_grid, quick_grid
from meft_ds.models import builtin_model_folder
from meft_ds.training import free_port

ROOT = Path(__file__).resolve().parents[2]
BUCKET = 5_000_000  # elements of DeepSpeed's gradient bucket, the same for every method (its default is 5e8)


def ds_config_file(folder: Path) -> Path:
    """The shipped config with one small gradient bucket for every method, no TensorBoard, and fp32 on every CPU (its
    "auto" means bf16 on one with AMX: the grid's runs from different machines would not compare)."""
    config = json.loads((ROOT / "ds_configs" / "meft.json").read_text())
    config["bf16"] = {"enabled": False}
    config["zero_optimization"].update(reduce_bucket_size=BUCKET, allgather_bucket_size=BUCKET)
    config.pop("tensorboard", None)
    path = folder / "ds_quality.json"
    path.write_text(json.dumps(config))
    return path


def train_command(
    grid: Grid, cell: Cell, lr: float, seed: int, ds_config: Path, output_dir: Path, model: str | None = None
) -> list[str]:
    model = ["--model", model or grid.model] if model or grid.model else []
    return [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(free_port()),
        str(ROOT / "launch" / "train.py"), "--deepspeed", str(ds_config), "--method", cell.method, *cell.args, *model,
        "--dataset", "facts", "--facts", str(grid.facts), "--max_steps", str(cell.steps or grid.steps),
        "--micro_batch_size", str(grid.micro_batch), "--eval_limit", str(grid.eval_limit), "--learning_rate", str(lr),
        "--seed", str(seed), "--output_dir", str(output_dir), "--no_save", "--no_eval_before",
    ]  # fmt: skip


def launch(command: list[str], output_dir: Path) -> dict[str, Any]:
    """Run one training process; its results.json."""
    run_process(command, ROOT)
    return json.loads((output_dir / "results.json").read_text())


def record_of(cell: Cell, lr: float, seed: int, results: dict[str, Any]) -> dict[str, Any]:
    retention = results["retention"] or {}
    return {
        "label": cell.label, "method": cell.method, "lr": lr, "seed": seed,
        "em": results["after"]["exact_match"], "f1": results["after"]["f1"],
        "retained": retention.get("fraction"), "device_bytes": results["device_training"]["device_bytes"],
        "trainable": results["trainable_params"], "last_loss": results["last_loss"], "seconds": results["seconds"],
    }  # fmt: skip


Runner = Callable[[list[str], Path], dict[str, Any]]


def run_grid(
    grid: Grid, work: Path, runner: Runner = launch, notes: list[str] | None = None,
    model: Callable[[], str] | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Every (cell, lr, seed) of ``grid``, one training process each, in ``work`` (``model()``: the --model to pass,
    asked for before the first run, in place of ``grid.model``). Each record is appended to ``work/records.jsonl``
    as its run ends; a run whose record is there already (same grid) is not run again, so an interrupted benchmark
    continues where it stopped."""
    work.mkdir(parents=True, exist_ok=True)
    notes = [] if notes is None else notes
    ds_config, done_path = ds_config_file(work), work / "records.jsonl"
    key = json.dumps(dataclasses.asdict(dataclasses.replace(grid, cells=())), sort_keys=True)
    done = [json.loads(line) for line in done_path.read_text().splitlines()] if done_path.exists() else []
    # the first record of each run, of this grid
    done_runs = {(r["label"], r["lr"], r["seed"]): r for r in reversed(done) if r.pop("grid", None) == key}
    records: list[dict[str, Any]] = []
    for cell in grid.cells:
        for lr, seed in itertools.product(cell.lrs, cell.seeds):
            if (cell.label, lr, seed) in done_runs:
                records.append(done_runs[(cell.label, lr, seed)])
                continue
            output_dir = work / f"{cell.label}-{lr:g}-{seed}".replace(" ", "_").replace(",", "").replace("=", "")
            command = train_command(grid, cell, lr, seed, ds_config, output_dir, model() if model else None)
            try:
                record = record_of(cell, lr, seed, runner(command, output_dir))
            except RuntimeError as error:  # one failed run is a note, not the end of an hour's benchmark
                print(f"  {cell.label} lr {lr:g} seed {seed} failed: {error}", flush=True)
                notes.append(f"{cell.label}, lr {lr:g}, seed {seed}: the run failed ({str(error)[-300:]})")
                continue
            with done_path.open("a") as handle:
                handle.write(json.dumps({**record, "grid": key}) + "\n")
            print(f"  {cell.label:40s} lr {lr:.0e} seed {seed}: EM {record['em']:.3f}, retained "
                  f"{_fraction(record['retained'])}, device {record['device_bytes'] / MB:.1f} MB "
                  f"({record['seconds']:.0f} s)", flush=True)  # fmt: skip
            records.append(record)
    return records


def best_per_cell(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each cell at its best learning rate (held-out EM, mean over seeds), with its sweep."""
    best = []
    for label in dict.fromkeys(r["label"] for r in records):
        mine = [r for r in records if r["label"] == label]
        by_lr: dict[float, list[dict[str, Any]]] = {}
        for r in mine:
            by_lr.setdefault(r["lr"], []).append(r)
        means = {lr: _mean(runs, "em") for lr, runs in by_lr.items()}
        lr = max(means, key=means.__getitem__)
        runs = by_lr[lr]
        best.append({
            "label": label, "method": runs[0]["method"], "lr": lr, "em": means[lr], "seeds": len(runs),
            "retained": _mean(runs, "retained"), "device_bytes": runs[0]["device_bytes"],
            "trainable": runs[0]["trainable"], "sweep": {f"{k:g}": v for k, v in means.items()},
        })  # fmt: skip
    return best


def _mean(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r[key] is not None]
    return sum(values) / len(values) if values else None


def _fraction(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


BYTES_TOLERANCE = 0.05  # "equal device bytes": MEFT's vary by ~5% run to run (the rows its routing fetches)


def judge(best: list[dict[str, Any]]) -> tuple[bool | None, str]:
    """The targets: MEFT >= the best LoRA at equal or larger device bytes than MEFT's + 0.05 EM, >= the best parallel
    adapter within MEFT's device bytes, and >= 90% retained; "equal" within ``BYTES_TOLERANCE`` of MEFT's bytes.
    The MEFT judged is the best by EM, of equals the one with the fewest device bytes. ``None`` when no part fails but
    one has no rival here."""
    meft = [b for b in best if b["method"] == "meft"]
    if not meft:
        return None, "no MEFT run"
    top = max(meft, key=lambda b: (b["em"], -b["device_bytes"]))
    parts, results = [f"best MEFT ({top['label']}, {top['device_bytes'] / MB:.0f} MB): EM {top['em']:.3f}"], []
    for method, name, margin, side in (  # side: the rival's device bytes at least (1) or at most (-1) MEFT's
        ("lora", "LoRA with as many device bytes or more", 0.05, 1),
        ("parallel_adapter", "parallel adapter within MEFT's bytes", 0.0, -1),
    ):
        bound = (1 - side * BYTES_TOLERANCE) * top["device_bytes"]
        rivals = [b for b in best if b["method"] == method and side * (b["device_bytes"] - bound) >= 0]
        if not rivals:
            parts.append(f"no {name} in this grid")
            results.append(None)
            continue
        rival = max(rivals, key=lambda b: b["em"])
        ok = top["em"] >= rival["em"] + margin
        parts.append(
            f"{'>=' if ok else '<'} {name}{f' + {margin}' if margin else ''} ({rival['label']}: {rival['em']:.3f})"
        )
        results.append(ok)
    retained = top["retained"]
    results.append(retained is not None and retained >= 0.9)
    parts.append(f"retains {_fraction(retained)} of the probe ({'>=' if results[-1] else '<'} 90%)")
    met = False if False in results else None if None in results else True
    return met, "; ".join(parts)


def section(runs: list[tuple[Grid, list[dict[str, Any]]]], notes: list[str]) -> Section:
    """One table over the tasks of ``runs`` (each grid with its records), each task judged on its own."""
    best, verdicts, judged = [], [], []
    for grid, records in runs:
        mine = [b | {"task": grid.task} for b in best_per_cell(records)]
        met, verdict = judge(mine)
        best += mine
        judged.append(met)
        verdicts.append(f"{grid.task}: {verdict}" if len(runs) > 1 else verdict)
    rows = [
        [b["task"], b["label"], f"{b['trainable'] / 1e6:.1f}M", f"{b['device_bytes'] / MB:.1f}",
         ", ".join(f"{lr}: {em:.3f}" for lr, em in b["sweep"].items()), b["lr"], f"{b['em']:.3f}", b["seeds"],
         _fraction(b["retained"])]
        for b in best
    ]  # fmt: skip
    met = False if False in judged else None if None in judged else True
    tasks = "; ".join(grid.task for grid, _ in runs)
    first = runs[0][0]
    records = [r | {"task": grid.task} for grid, rs in runs for r in rs]
    data = {"grids": [dataclasses.asdict(grid) for grid, _ in runs], "records": records, "best": best}
    return common.section(
        "quality", {"grid": first, "tasks": tasks, "bucket": BUCKET}, rows=rows, met=met, verdict="; ".join(verdicts),
        notes=notes, data=data,
    )  # fmt: skip


def run(context: Context) -> Section:
    choice = context.settings.quality_grids
    grids = {"all": (full_grid(), capacity_grid()), "headline": (headline_grid(),), "quick": (quick_grid(),)}[choice]
    notes = common.paragraphs("quality", "full_notes") if choice == "all" else []
    runs = []
    for grid in grids:
        work = ROOT / "outputs" / f"bench_quality_{grid.name}"  # kept: a rerun continues an interrupted benchmark
        # the built-in model as fp32 safetensors, which a training process loads in seconds (its GGUF file: minutes)
        model = None if grid.model else lambda: str(builtin_model_folder())
        runs.append((grid, run_grid(grid, work, notes=notes, model=model)))
    return section(runs, notes)


def plot(section: Section, path: str) -> None:
    """EM against device bytes (points numbered) beside the fraction of the probe retained (bars named by number)."""
    from matplotlib import ticker

    best = section.data["best"]
    height = max(5.5, 0.2 * len(best) + 1)  # a readable bar label per configuration
    figure, (left, right) = plots.figure(15, height, ncols=2, gridspec_kw={"width_ratios": [1, 1.2], "wspace": 1.1})
    colours = {"meft": "tab:blue", "lora": "tab:orange", "parallel_adapter": "tab:green", "full": "tab:red"}
    markers = dict(zip(dict.fromkeys(b["task"] for b in best), "os^D", strict=False))  # one shape per task
    for number, b in enumerate(best, 1):
        x = b["device_bytes"] / MB
        left.scatter(x, b["em"], color=colours[b["method"]], marker=markers[b["task"]], s=50)
        left.annotate(str(number), (x, b["em"]), fontsize=8, xytext=(4, 3), textcoords="offset points")
    first = best[0]["task"]
    names = [f"{n}. {b['label']}" + ("" if b["task"] == first else f" ({b['task']})") for n, b in enumerate(best, 1)]
    right.barh(names, [b["retained"] or 0.0 for b in best], color=[colours[b["method"]] for b in best])
    right.invert_yaxis()  # 1 at the top
    left.set(xscale="log", xlabel="device-resident training bytes (MB, log)", ylabel="held-out EM (best lr)")
    left.set_title("EM vs device bytes (numbers: the configurations at right)")
    if len(markers) > 1:
        for task, marker in markers.items():
            left.scatter([], [], color="gray", marker=marker, label=task)
        left.legend(fontsize=8, title="task")
    label = ticker.FuncFormatter(lambda value, _: f"{value:g}" if f"{value:g}"[0] in "125" else "")
    left.xaxis.set_major_formatter(label)
    left.xaxis.set_minor_formatter(label)
    right.axvline(0.9, color="gray", linestyle=":", label="target 90%")
    right.set(xlabel="probe questions still right", title="knowledge retained")
    right.tick_params(axis="y", labelsize=8)
    right.legend(fontsize=8)
    plots.save(figure, section, path, left=0.05, right=0.98, wspace=0.95)
