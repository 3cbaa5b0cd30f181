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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import common, plots
from bench.common import MB, Context, Section, free_port, run_process
from meft_ds.models import builtin_model_folder

ROOT = Path(__file__).resolve().parents[2]
BUCKET = 5_000_000  # elements of DeepSpeed's gradient bucket, the same for every method (its default is 5e8)


@dataclass(frozen=True)
class Cell:
    """One configuration: a method at one size, run at every learning rate of ``lrs`` and every seed of ``seeds``."""

    label: str
    method: str
    args: tuple[str, ...]  # train.py arguments of this configuration besides --method
    lrs: tuple[float, ...]
    seeds: tuple[int, ...] = (0,)
    steps: int | None = None  # optimizer steps, when not the grid's (the rehearsal-only controls)


@dataclass(frozen=True)
class Grid:
    facts: int
    steps: int
    micro_batch: int
    eval_limit: int
    cells: tuple[Cell, ...]
    model: str | None = None  # None: the built-in model
    name: str = "full"

    @property
    def task(self) -> str:
        return f"{self.facts} facts, {self.steps} steps"


def meft(
    label: str,
    neurons: int,
    lrs: tuple[float, ...],
    *extra: str,
    seeds: tuple[int, ...] = (0,),
    steps: int | None = None,
) -> Cell:
    return Cell(label, "meft", ("--meft", f"num_neurons={neurons}", *extra), lrs, seeds, steps)


def tfidf(rows: int) -> tuple[str, ...]:
    """train.py arguments of TF-IDF row selection: ``rows`` updated per layer and step (meft.update_rows)."""
    return ("--meft", f"update_rows={rows}")


SEPARATE = ("--meft", "clip_rows=separate")  # the rows clipped by their own norm
PER_ROW = ("--meft", "bias_correction=per_row")
REHEARSE = ("--rehearsal", "80")  # the untrained model's right answers (the launcher's default)
REHEARSE_ALL = (*REHEARSE, "--rehearsal_answers", "all")  # all of them (the launcher's only way until 2026-12-05)
# a control: the rehearsed answers alone, no facts, for about as many samples of them as the mixed run sees (its
# passes over facts + rehearsal: 800 samples over 499 examples on 150 facts, 10 steps of 8; 2,400 over 1,249 on 400, 12)
CONTROL = (*REHEARSE, "--train_limit", "0")
# a quarter of r=32768's default 1,024 experts, probing a quarter as many: the same 256 keys scored per token, a
# quarter of the routers' device bytes
FEW_EXPERTS = ("--meft", "num_experts=256", "--meft", "n_probe=2")


def full_grid() -> Grid:
    """What ran on 2026-12-03/04 in about 3 hours of our 2 cores (see ``full_notes`` in sections.md): the issue's task
    size (150 facts, 100 steps of 8); MEFT at r=4096 with its clipping, bias-correction and rehearsal variants, and at
    r=16384; LoRA at r=64, 256, 288 (MEFT r=16384's device bytes) and 512; the parallel adapter just below MEFT r=4096's
    bytes (r=1024) and at r=4096; full fine-tuning, the upper bound; then (2026-12-04) MEFT r=4096 with TF-IDF row
    selection at three sizes and with rehearsal (two seeds); then (2026-12-06) MEFT's default and LoRA r=64 rehearsing
    only the untrained model's right answers (the launcher's default since), and MEFT's default rehearsing all of them;
    then MEFT r=32768 with activation checkpointing, the larger task's headline MEFT (~176 MB of device
    bytes), at two rates and with rehearsal, and MEFT r=4096 with half the rows firing per token (K=32), with and
    without rehearsal, and MEFT's default with rehearsal at two lower rates, and a second seed of LoRA r=64 with
    rehearsal; then the controls of MEFT's default and LoRA r=64 with rehearsal, trained on the rehearsed answers
    alone (no facts: what rehearsing costs the probe by itself). A second cell with the same label and
    ``seeds=(1,)`` adds a seed to a configuration, one with other ``lrs`` extends its sweep."""
    return Grid(
        facts=150, steps=100, micro_batch=8, eval_limit=100,
        cells=(
            meft("MEFT r=4096, rows clipped apart", 4096, (3e-3, 1e-3), *SEPARATE),
            Cell("LoRA r=64", "lora", ("--lora_r", "64"), (3e-3, 1e-3)),
            Cell("LoRA r=64", "lora", ("--lora_r", "64"), (3e-3,), seeds=(1,)),
            meft("MEFT r=4096, global clip (default)", 4096, (3e-3, 1e-2)),
            meft("MEFT r=4096, global clip (default)", 4096, (3e-3,), seeds=(1,)),
            meft("MEFT r=4096, rows not clipped", 4096, (3e-3,), "--meft", "clip_rows=none"),
            meft("MEFT r=4096, rows apart, per-row bias correction", 4096, (3e-3,), *SEPARATE, *PER_ROW),
            meft("MEFT r=4096, rows apart, per-row bias correction", 4096, (3e-3,), *SEPARATE, *PER_ROW, seeds=(1,)),
            meft("MEFT r=4096, rows apart, rehearsal 80, all answers", 4096, (3e-3,), *SEPARATE, *REHEARSE_ALL),
            Cell("LoRA r=64, rehearsal 80, all answers", "lora", ("--lora_r", "64", *REHEARSE_ALL), (3e-3,)),
            Cell("parallel adapter r=1024", "parallel_adapter", ("--adapter_neurons", "1024"), (3e-3,)),
            Cell("LoRA r=256", "lora", ("--lora_r", "256"), (1e-3,)),
            meft("MEFT r=16384, global clip", 16384, (3e-3,)),
            meft("MEFT r=4096, global clip (default)", 4096, (5e-3,)),
            Cell("LoRA r=256", "lora", ("--lora_r", "256"), (3e-3,)),
            meft("MEFT r=16384, global clip", 16384, (3e-3,), seeds=(1,)),
            Cell("LoRA r=512", "lora", ("--lora_r", "512"), (1e-3, 5e-4)),
            Cell("LoRA r=256", "lora", ("--lora_r", "256"), (1e-3,), seeds=(1,)),
            Cell("LoRA r=288", "lora", ("--lora_r", "288"), (5e-4,)),
            meft("MEFT r=16384, global clip", 16384, (1e-3, 5e-3)),
            Cell("LoRA r=288", "lora", ("--lora_r", "288"), (5e-4,), seeds=(1,)),
            Cell("LoRA r=288", "lora", ("--lora_r", "288"), (1e-3,)),
            Cell("LoRA r=512", "lora", ("--lora_r", "512"), (5e-4,), seeds=(1,)),
            Cell("full fine-tuning", "full", (), (1e-4,)),
            Cell("parallel adapter r=4096", "parallel_adapter", ("--adapter_neurons", "4096"), (1e-3,)),
            meft("MEFT r=4096, TF-IDF 512 rows", 4096, (3e-3,), *tfidf(512), seeds=(0, 1)),
            meft("MEFT r=4096, TF-IDF 128 rows", 4096, (3e-3,), *tfidf(128)),
            meft("MEFT r=4096, TF-IDF 512 rows, rehearsal 80, all answers", 4096, (3e-3,), *tfidf(512), *REHEARSE_ALL),
            meft("MEFT r=4096, TF-IDF 1024 rows", 4096, (3e-3,), *tfidf(1024)),
            meft("MEFT r=4096, TF-IDF 512 rows, rehearsal 80, all answers", 4096, (3e-3,), *tfidf(512), *REHEARSE_ALL,
                 seeds=(1,)),
            meft("MEFT r=4096, global clip (default), rehearsal 80", 4096, (3e-3,), *REHEARSE, seeds=(0, 1)),
            Cell("LoRA r=64, rehearsal 80", "lora", ("--lora_r", "64", *REHEARSE), (3e-3,)),
            meft("MEFT r=4096, global clip (default), rehearsal 80, all answers", 4096, (3e-3,), *REHEARSE_ALL),
            meft("MEFT r=32768, checkpointed", 32768, (3e-3, 1e-3), "--activation_checkpointing"),
            meft("MEFT r=32768, checkpointed, rehearsal 80", 32768, (1e-3,), "--activation_checkpointing", *REHEARSE),
            meft("MEFT r=4096, K=32", 4096, (3e-3,), "--meft", "top_k=32"),
            meft("MEFT r=4096, K=32, rehearsal 80", 4096, (3e-3,), "--meft", "top_k=32", *REHEARSE),
            meft("MEFT r=4096, global clip (default), rehearsal 80", 4096, (2e-3, 1e-3), *REHEARSE),
            Cell("LoRA r=64, rehearsal 80", "lora", ("--lora_r", "64", *REHEARSE), (3e-3,), seeds=(1,)),
            meft("MEFT r=4096, rehearsal 80 alone (control)", 4096, (3e-3,), *CONTROL, seeds=(0, 1), steps=10),
            Cell("LoRA r=64, rehearsal 80 alone (control)", "lora", ("--lora_r", "64", *CONTROL), (3e-3,), (0, 1), 10),
        ),
    )  # fmt: skip


def capacity_grid() -> Grid:
    """The issue's larger task: 400 facts (1,200 training questions, 2.7x the default's), 300 steps of 8 (two passes
    over them, as 100 steps are over the default's 450); the headline configurations at their best learning rates on
    150 facts: MEFT r=16384 against LoRA r=288 (its device bytes) and r=64 (fewer), then MEFT r=4096, then MEFT r=16384
    at a higher rate (its training loss stayed above LoRA's at 3e-3); then a second seed of the headline pair; then
    MEFT r=16384 with twice the neurons firing per token, with its rows clipped apart and bias corrected per row, and
    at a lower rate; the parallel adapter; a second seed of MEFT r=16384 at 2e-3; LoRA r=288's sweep widened, then
    MEFT's (1e-3); MEFT r=16384 at 1e-3 with rehearsal, and with TF-IDF row selection (2048 rows: the share of 512 at
    r=4096) and rehearsal, for what it retains; second seeds of LoRA r=288 and MEFT r=16384 at their best rates; then
    MEFT at r=32768 (twice the rows at the same K and probed keys per token), LoRA r=400 at its device bytes (607 MB:
    a micro-batch's union of rows grows with r) at two rates, a second seed of each at its best rate, and both with
    rehearsal, for what they retain at equal bytes; then MEFT r=32768 with activation checkpointing (one layer's
    fetched rows on the device: 176 MB), LoRA (r=104) and the parallel adapter (r=512) at those bytes, LoRA's sweep
    widened and a second seed at its best rate; then both rehearsing the untrained model's right answers (three
    seeds); then (2026-12-06) the checkpointed MEFT with a quarter of the experts (a quarter of the routers' bytes)
    at two rates, third seeds of the pair at ~177 MB (and of the same MEFT without checkpointing), and both
    rehearsal runs' controls (the rehearsed answers alone); then LoRA at the 256-expert MEFT's bytes (r=32), and
    a second seed of each at its best rate; then, the device bytes corrected (ZeRO-2's offloaded gradients), LoRA at
    the two checkpointed MEFTs' new bytes: r=117 (110 MB, three seeds) and r=42 (52 MB, two seeds)."""
    return Grid(
        facts=400, steps=300, micro_batch=8, eval_limit=100, name="capacity",
        cells=(
            meft("MEFT r=16384, global clip", 16384, (3e-3,)),
            Cell("LoRA r=288", "lora", ("--lora_r", "288"), (1e-3,)),
            Cell("LoRA r=64", "lora", ("--lora_r", "64"), (3e-3,)),
            meft("MEFT r=4096, global clip (default)", 4096, (3e-3,)),
            meft("MEFT r=16384, global clip", 16384, (5e-3,)),
            meft("MEFT r=16384, global clip", 16384, (3e-3,), seeds=(1,)),
            Cell("LoRA r=288", "lora", ("--lora_r", "288"), (1e-3,), seeds=(1,)),
            meft("MEFT r=16384, K=128", 16384, (3e-3,), "--meft", "top_k=128"),
            meft("MEFT r=16384, rows apart, per-row bias correction", 16384, (3e-3,), *SEPARATE, *PER_ROW),
            meft("MEFT r=16384, global clip", 16384, (2e-3,)),
            Cell("parallel adapter r=1024", "parallel_adapter", ("--adapter_neurons", "1024"), (3e-3,)),
            meft("MEFT r=16384, global clip", 16384, (2e-3,), seeds=(1,)),
            Cell("LoRA r=288", "lora", ("--lora_r", "288"), (2e-3, 5e-4)),
            meft("MEFT r=16384, global clip", 16384, (1e-3,)),
            meft("MEFT r=16384, rehearsal 80, all answers", 16384, (1e-3,), *REHEARSE_ALL),
            meft("MEFT r=16384, TF-IDF 2048 rows, rehearsal 80, all answers", 16384, (1e-3,), *tfidf(2048),
                 *REHEARSE_ALL),
            Cell("LoRA r=288", "lora", ("--lora_r", "288"), (5e-4,), seeds=(1,)),
            meft("MEFT r=16384, global clip", 16384, (1e-3,), seeds=(1,)),
            meft("MEFT r=32768, global clip", 32768, (1e-3,)),
            Cell("LoRA r=400", "lora", ("--lora_r", "400"), (5e-4,)),
            meft("MEFT r=32768, global clip", 32768, (1e-3,), seeds=(1,)),
            Cell("LoRA r=400", "lora", ("--lora_r", "400"), (1e-3,)),
            Cell("LoRA r=400", "lora", ("--lora_r", "400"), (5e-4,), seeds=(1,)),
            Cell("LoRA r=400, rehearsal 80, all answers", "lora", ("--lora_r", "400", *REHEARSE_ALL), (5e-4,)),
            meft("MEFT r=32768, rehearsal 80, all answers", 32768, (1e-3,), *REHEARSE_ALL),
            meft("MEFT r=32768, checkpointed", 32768, (1e-3,), "--activation_checkpointing", seeds=(0, 1)),
            Cell("LoRA r=104", "lora", ("--lora_r", "104"), (1e-3, 2e-3)),
            Cell("parallel adapter r=512", "parallel_adapter", ("--adapter_neurons", "512"), (3e-3,)),
            Cell("LoRA r=104", "lora", ("--lora_r", "104"), (5e-4,)),
            Cell("LoRA r=104", "lora", ("--lora_r", "104"), (1e-3,), seeds=(1,)),
            meft("MEFT r=32768, checkpointed, rehearsal 80", 32768, (1e-3,), "--activation_checkpointing", *REHEARSE),
            Cell("LoRA r=104, rehearsal 80", "lora", ("--lora_r", "104", *REHEARSE), (1e-3,)),
            meft("MEFT r=32768, checkpointed, rehearsal 80", 32768, (1e-3,), "--activation_checkpointing", *REHEARSE,
                 seeds=(1, 2)),
            Cell("LoRA r=104, rehearsal 80", "lora", ("--lora_r", "104", *REHEARSE), (1e-3,), seeds=(1, 2)),
            meft("MEFT r=32768, checkpointed, 256 experts", 32768, (1e-3,), "--activation_checkpointing", *FEW_EXPERTS),
            meft("MEFT r=32768, checkpointed, 256 experts", 32768, (2e-3,), "--activation_checkpointing", *FEW_EXPERTS),
            meft("MEFT r=32768, checkpointed", 32768, (1e-3,), "--activation_checkpointing", seeds=(2,)),
            Cell("LoRA r=104", "lora", ("--lora_r", "104"), (1e-3,), seeds=(2,)),
            meft("MEFT r=32768, global clip", 32768, (1e-3,), seeds=(2,)),  # the checkpointed run's twin, bit for bit
            meft("MEFT r=32768, checkpointed, rehearsal 80 alone (control)", 32768, (1e-3,),
                 "--activation_checkpointing", *CONTROL, seeds=(0, 1), steps=12),
            Cell("LoRA r=104, rehearsal 80 alone (control)", "lora", ("--lora_r", "104", *CONTROL), (1e-3,), (0, 1),
                 12),
            Cell("LoRA r=32", "lora", ("--lora_r", "32"), (1e-3, 2e-3, 3e-3)),  # the 256-expert MEFT's device bytes
            meft("MEFT r=32768, checkpointed, 256 experts", 32768, (1e-3,), "--activation_checkpointing", *FEW_EXPERTS,
                 seeds=(1,)),
            Cell("LoRA r=32", "lora", ("--lora_r", "32"), (2e-3,), seeds=(1,)),
            Cell("LoRA r=117", "lora", ("--lora_r", "117"), (1e-3,), seeds=(0, 1, 2)),  # bytes = MEFT r=32768 ckpt's
            Cell("LoRA r=42", "lora", ("--lora_r", "42"), (2e-3,), seeds=(0, 1)),  # bytes = the 256-expert MEFT's
        ),
    )  # fmt: skip


# the larger task's headline comparison at MEFT's best device budget, each cell at its best learning rate
HEADLINE = {"MEFT r=32768, checkpointed": 1e-3, "LoRA r=117": 1e-3, "parallel adapter r=512": 3e-3, "LoRA r=400": 5e-4}


def headline_grid() -> Grid:
    """The benchmark in about an hour of our 2 cores from scratch (45 min on the Intel Xeon): the larger task's
    best MEFT (r=32768 with activation checkpointing, 110 MB of device bytes) against LoRA of the same bytes (r=117),
    the parallel adapter within them (r=512) and the best LoRA (r=400, 329 MB), one seed each at its best rate.
    Its runs are the capacity grid's (the same task, cells, records folder): run after that grid they are not run
    again; run alone they reproduce its seed-0 rows within run-to-run noise (sums round differently on another CPU)."""
    grid = capacity_grid()
    by_label = {cell.label: cell for cell in grid.cells}  # a label's cells differ only in their rates and seeds
    cells = tuple(dataclasses.replace(by_label[label], lrs=(lr,), seeds=(0,)) for label, lr in HEADLINE.items())
    return dataclasses.replace(grid, cells=cells)


def quick_grid(model: str | None = None) -> Grid:
    """CI-sized: a few steps of each method, one learning rate."""
    return Grid(
        facts=25, steps=3, micro_batch=4, eval_limit=8, model=model, name="quick",
        cells=(
            meft("MEFT r=256", 256, (3e-3,), "--meft", "top_k=8"),
            Cell("LoRA r=4", "lora", ("--lora_r", "4"), (3e-3,)),
            Cell("parallel adapter r=16", "parallel_adapter", ("--adapter_neurons", "16"), (3e-3,)),
        ),
    )  # fmt: skip


def ds_config_file(folder: Path) -> Path:
    """The shipped config with one small gradient bucket for every method and no TensorBoard."""
    config = json.loads((ROOT / "ds_configs" / "meft.json").read_text())
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
