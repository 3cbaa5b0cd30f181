"""Benchmarks of meft_ds (issue 5), all in one run; writes results JSON, PNG plots and BENCHMARKS.md.

    python launch/bench.py                     # the full run, about 20 minutes on 2 CPU cores
    python launch/bench.py --quick             # about 5 minutes, smaller sizes
    python launch/bench.py --only a,c --out docs/bench --meft n_probe=16 --cache-mb 512
    python launch/bench.py --render            # BENCHMARKS.md again from docs/bench (e.g. after a GPU check)
    python launch/bench.py --only quality      # learning quality: 132 training runs, ~20 h of 2 cores from scratch;
                                               # it keeps each run's record and continues from them (outputs/)
    python launch/bench.py --only quality --quality-grid headline --out /tmp/q
                                               # its headline comparison alone, 4 runs, about an hour
                                               # (written to /tmp/q: results.json, plots, BENCHMARKS.md)

Experiments: a. host<->device bytes per optimizer step, MEFT vs a dense adapter under ZeRO-Offload; b. sparse Adam
GB/s vs DeepSpeed's dense CPU Adam vs copy_; c. step time vs LoRA and dense adapters; d. adapter bytes on the device
as r grows; e. CPU routing cost vs the number of experts; f. scale out: bytes between 2 ranks per optimizer step
(replicated vs sharded stores vs a dense adapter's all-reduce) and the NVMe tier's read/write GB/s; g. generate()
tokens/s with routing on the host (the training path) vs on the device (meft_ds.for_inference); quality. held-out EM
and knowledge retained vs device bytes, MEFT vs LoRA vs the parallel adapter. Each module under launch/bench/ measures
one; launch/bench/sections.md says how, in the words BENCHMARKS.md prints.
``--meft KEY=VALUE`` overrides go to every MEFT variant (through ``meft_ds.MeftConfig.from_dict``).
"""

from __future__ import annotations

import os
from pathlib import Path

# before torch/deepspeed are imported: the CPU accelerator, no hub (the JIT-built ops: torch's extension cache)
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import dataclasses
import datetime
import resource
import shlex
import sys
import time
from types import ModuleType

import matplotlib

matplotlib.use("Agg")

from bench import adam, inference, memory, quality, routing_cost, scaleout, steptime, traffic
from bench.common import Context, Section, Settings
from bench.report import load_results, machine, render_markdown, write_results

from meft_ds.config import MeftConfig
from meft_ds.host_memory import keep_freed_host_memory
from meft_ds.training import UsageError, parse_overrides, run_cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "bench"
EXPERIMENTS: dict[str, tuple[ModuleType, str]] = {
    "a": (traffic, "a_traffic.png"),
    "b": (adam, "b_sparse_adam.png"),
    "c": (steptime, "c_step_time.png"),
    "d": (memory, "d_device_bytes.png"),
    "e": (routing_cost, "e_routing_cost.png"),
    "f": (scaleout, "f_scaleout.png"),
    "g": (inference, "g_generation.png"),
    "quality": (quality, "quality.png"),
}
DEFAULT = [key for key in EXPERIMENTS if key != "quality"]  # quality trains 132 models: run it on its own


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (~5 min)")
    parser.add_argument("--only", default=",".join(DEFAULT), help="experiments to run, e.g. a,c or quality")
    parser.add_argument("--out", type=Path, default=DOCS, help=f"results.json and plots (default: {DOCS})")
    parser.add_argument(
        "--markdown",
        type=Path,
        default=None,
        help=f"the rendered page; default: {ROOT / 'BENCHMARKS.md'} with the default --out, else <out>/BENCHMARKS.md",
    )
    parser.add_argument("--meft", action="append", default=[], metavar="KEY=VALUE", help="MeftConfig override")
    parser.add_argument(
        "--cache-mb",
        type=float,
        default=None,
        help="a.'s cache variant budget (MiB per model); default: the dense adapter's device bytes under ZeRO-Offload",
    )
    parser.add_argument("--micro-steps", type=int, default=None, help="a.'s G (32; quick: 4)")
    parser.add_argument("--render", action="store_true", help="only re-render BENCHMARKS.md from the stored results")
    parser.add_argument(
        "--quality-grid",
        choices=("all", "headline"),
        default=None,
        help="quality's runs: all (132, ~20 h from scratch) or the headline comparison (4, ~1 h); --quick: CI-sized",
    )
    args = parser.parse_args(argv)
    args.only = [key.strip() for key in args.only.split(",") if key.strip()]
    if args.markdown is None:  # a run written elsewhere renders beside its results, not over the project's page
        args.markdown = ROOT / "BENCHMARKS.md" if args.out.resolve() == DOCS else args.out / "BENCHMARKS.md"
    if args.micro_steps is not None and args.micro_steps < 1:
        parser.error(f"--micro-steps: G must be at least 1, got {args.micro_steps}")
    if args.cache_mb is not None and args.cache_mb <= 0:
        parser.error(f"--cache-mb must be positive, got {args.cache_mb:g}")
    # written last: found missing only after the whole run otherwise (--out itself is created before the run)
    if args.markdown.parent != args.out and not args.markdown.parent.is_dir():
        parser.error(f"--markdown {args.markdown}: no folder {args.markdown.parent}. Fix: create it, or name a file "
                     "in an existing folder.")  # fmt: skip
    unknown = [key for key in args.only if key not in EXPERIMENTS]
    if unknown:
        parser.error(f"--only: unknown experiment(s) {unknown}; use some of {','.join(EXPERIMENTS)}")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    settings = Settings.quick() if args.quick else Settings.full()
    if args.micro_steps is not None:
        settings = dataclasses.replace(settings, accum_steps=args.micro_steps)
    if args.quality_grid is not None:
        settings = dataclasses.replace(settings, quality_grids=args.quality_grid)
    command = shlex.join(["python", "launch/bench.py", *argv])
    overrides = parse_overrides(args.meft)
    MeftConfig.check_keys(overrides)  # their values are checked with each experiment's own
    # as launch/train.py trains on the CPU: freed host memory kept for reuse, for every variant of every experiment
    kept = not args.render and keep_freed_host_memory()
    context = Context(settings, command, overrides, args.cache_mb, kept_freed_memory=kept)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"--out {args.out}: cannot create it ({error}). Fix: choose a writable folder.") from None
    results_path = args.out / "results.json"
    stored = load_results(results_path)
    if args.render:
        args.only = []
    keep_others = set(args.only) != set(EXPERIMENTS)
    sections = {k: Section.from_json(v) for k, v in stored["sections"].items()} if keep_others else {}
    previous = stored.get("meta", {})
    meta = previous if args.render else {"machine": machine(), "last_command": command}
    # each section's machine: kept sections keep theirs (results stored before this record: the stored run's)
    machines = {k: v for k, v in previous.get("machines", {}).items() if k in sections}
    machines |= {k: previous["machine"] for k in sections if k not in machines and "machine" in previous}
    meta["machines"] = machines | {k: meta["machine"] for k in args.only}
    started = time.perf_counter()
    for key in args.only:
        module, image = EXPERIMENTS[key]
        print(f"[{key}] {module.__name__} ({time.perf_counter() - started:.0f} s into the run)", flush=True)
        begin = time.perf_counter()
        section = module.run(context)
        section.command = command
        section.mode = "quick" if args.quick else "full"
        section.measured_at = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        section.seconds = time.perf_counter() - begin
        section.plot = image
        module.plot(section, str(args.out / image))
        sections[key] = section
        write_results(results_path, sections, meta)  # after each experiment, so a crash keeps the others
        print(f"[{key}] {section.verdict} ({section.seconds:.0f} s)", flush=True)
    if not args.render:
        meta["seconds"] = time.perf_counter() - started
        meta["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB
        write_results(results_path, sections, meta)
    images = {k: os.path.relpath(args.out / s.plot, args.markdown.parent) for k, s in sections.items() if s.plot}
    results_link = os.path.relpath(results_path, args.markdown.parent)
    gpu_table = args.out / "gpu_check.md"  # launch/gpu_check.sh's gpu_bench.md, copied here
    gpu_check = gpu_table.read_text() if gpu_table.is_file() else None
    args.markdown.write_text(render_markdown(dict(sorted(sections.items())), meta, images, results_link, gpu_check))
    if args.render:
        print(f"wrote {args.markdown}")
    else:
        print(f"wrote {results_path}, {args.markdown} in {meta['seconds']:.0f} s, peak {meta['peak_rss_gb']:.1f} GB")
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))  # bad input (e.g. a --meft key) in one line, not a traceback
