"""The GPU check's benchmark (run by launch/gpu_check.sh): MEFT on a randomly initialised LLaMA-2-7B-shaped model in
bf16, against LoRA r = 16 on q,v and against no adapter at all, under DeepSpeed ZeRO-2 with the trainable parameters'
optimizer offloaded to the CPU (``ds_configs/meft.json``).

    python launch/gpu_bench.py --out outputs/gpu_check             # on a CUDA machine (92-136 s on one H200)
    python launch/gpu_bench.py --dry-run --out outputs/gpu_check   # the same code at tiny sizes, on any machine
    python launch/gpu_bench.py --meft cache_mb=12700 --profile     # MEFT with the whole adapter cached; cProfile

Per variant, over timed optimizer steps after a warm-up step: tokens/s; peak device memory
(``max_memory_allocated``, from the variant's start); host<->device bytes per optimizer step (``meft_ds.stats``,
MEFT only: DeepSpeed does not count its own). For MEFT, per layer, the time the device waits for the host: from the
end of the FFN's kernels (an event recorded on the compute stream as the adapter starts routing, after the FFN was
queued) to the moment its rows are usable (an event recorded after the compute stream waits for their copy), the
median and the 90th percentile over layers and micro-steps; then, over as many more steps, where MEFT's host time goes,
phase by phase (``bench/timeline.py``, the split benchmark c. reports on the CPU). "No adapter" is the frozen model's
forward and backward (inputs requiring gradient, so the backward runs through every layer), the floor any adapter
adds to.
Then ``gpu_generate.py`` on the trained MEFT model: generate() with routing on the host and on the device, and their
agreement on identical inputs. Writes ``gpu_bench.json`` and ``gpu_bench.md`` (the tables BENCHMARKS.md includes) into
``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gpu_generate
import torch
from bench import timeline
from bench.common import fmt_bytes
from deepspeed.accelerator import get_accelerator

import meft_ds
from meft_ds import adapter as adapter_module
from meft_ds.config import merge_settings
from meft_ds.ds_config import compute_dtype, fit_precision_to_cpu, load_deepspeed_config
from meft_ds.model_facts import load_model_config
from meft_ds.training import parse_overrides

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on whatever accelerator DeepSpeed picks")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "gpu_check")
    parser.add_argument("--steps", type=int, help="timed optimizer steps per variant (default 3, dry run 2)")
    parser.add_argument("--accumulation", type=int, help="micro-steps per optimizer step (default 4, dry run 2)")
    parser.add_argument("--profile", action="store_true", help="then as many MEFT steps under cProfile (the host's "
                        "top functions, in gpu_profile.txt)")  # fmt: skip
    parser.add_argument("--meft", action="append", default=[], metavar="KEY=VALUE",
                        help="MeftConfig override of the MEFT variant, e.g. cache_mb=12700")  # fmt: skip
    return parser.parse_args(argv)


def sizes(dry_run: bool) -> dict[str, Any]:
    if dry_run:
        from transformers import LlamaConfig

        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=1000, max_position_embeddings=128)  # fmt: skip
        return {"model": "tiny LLaMA (dry run)", "config": config, "neurons": 256, "batch": 2, "seq": 32}
    return {
        "model": "LLaMA-2-7B shape",
        "config": load_model_config("llama-2-7b"),
        "neurons": 8464,
        "batch": 2,
        "seq": 256,
    }


def random_model(config: Any, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The architecture with random weights, built on the device (no weights to load)."""
    from transformers import AutoModelForCausalLM

    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.requires_grad_(False)


def engine_config(accumulation: int, batch: int, meft: dict[str, Any] | None) -> dict[str, Any]:
    """``ds_configs/meft.json`` with numbers in place of its "auto" values, bf16 on (on a CPU only if it computes
    bf16 natively: the dry run)."""
    config = load_deepspeed_config(ROOT / "ds_configs" / "meft.json")
    config.update(train_micro_batch_size_per_gpu=batch, gradient_accumulation_steps=accumulation,
                  gradient_clipping=1.0, bf16={"enabled": True})  # fmt: skip
    config.pop("train_batch_size", None)
    config.pop("tensorboard", None)
    config["optimizer"]["params"] = {"lr": 1e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}
    config.pop("scheduler", None)
    if meft is None:
        config.pop("meft", None)
    else:
        config["meft"] = {**config["meft"], **meft}
    fit_precision_to_cpu(config)
    return config


class WaitTimer:
    """Per adapter call, the device's wait for the host: the gap between an event recorded when ``finish`` starts
    (the FFN's kernels are queued before it) and one recorded after the rows' copy is waited for."""

    def __init__(self) -> None:
        self.pairs: list[tuple[Any, Any]] = []
        self.host_seconds: list[float] = []
        self._accelerator = get_accelerator()

    def _mark(self) -> Any:
        if self._accelerator.Event is None:
            return time.perf_counter()
        event = self._accelerator.Event(enable_timing=True)
        event.record()
        return event

    @contextmanager
    def installed(self) -> Iterator[None]:
        finish, wait = adapter_module.SparseKeyExpertAdapter.finish, adapter_module.RowsInFlight.wait
        starts: list[Any] = []

        def timed_finish(adapter: Any, hidden: torch.Tensor, pending: Any) -> torch.Tensor:
            starts.append(self._mark())
            return finish(adapter, hidden, pending)

        def timed_wait(rows: Any) -> torch.Tensor:
            result = wait(rows)
            if starts:
                self.pairs.append((starts.pop(), self._mark()))
            return result

        adapter_module.SparseKeyExpertAdapter.finish = timed_finish
        adapter_module.RowsInFlight.wait = timed_wait
        try:
            yield
        finally:
            adapter_module.SparseKeyExpertAdapter.finish, adapter_module.RowsInFlight.wait = finish, wait

    def milliseconds(self) -> list[float]:
        self._accelerator.synchronize()
        if self._accelerator.Event is None:  # no events: the host's own time for routing and the fetch
            return [1e3 * (end - start) for start, end in self.pairs]
        return [start.elapsed_time(end) for start, end in self.pairs]


def measure(label: str, step: Callable[[], None], tokens_per_step: int, steps: int, model: torch.nn.Module) -> dict:
    """Warm-up step, then ``steps`` timed steps; tokens/s, peak device memory, MEFT's counters per step."""
    accelerator = get_accelerator()
    step()
    accelerator.synchronize()
    before = meft_ds.stats(model) if meft_ds.adapters(model) else {}
    started = time.perf_counter()
    for _ in range(steps):
        step()
    accelerator.synchronize()
    seconds = time.perf_counter() - started
    after = meft_ds.stats(model) if before else {}
    result = {
        "variant": label,
        "tokens_per_s": tokens_per_step * steps / seconds,
        "seconds_per_step": seconds / steps,
        "peak_device_gib": accelerator.max_memory_allocated() / 2**30,
    }
    for key in ("bytes_to_device", "bytes_to_host", "rows_fetched"):
        if key in after:
            result[f"{key}_per_step"] = (after[key] - before[key]) / steps
    print(f"  {label}: {result['tokens_per_s']:.0f} tokens/s, peak {result['peak_device_gib']:.2f} GiB", flush=True)
    return result


def profile(step: Callable[[], None], steps: int, path: Path) -> None:
    """``steps`` calls of ``step`` under cProfile: the host's 40 top functions by own time and by cumulative time
    (time blocked on the device shows as the own time of ``synchronize``). The backward runs in the calling thread
    meanwhile (autograd's device threads are out of cProfile's sight)."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    with torch.autograd.set_multithreading_enabled(False):
        profiler.runcall(lambda: [step() for _ in range(steps)])
    get_accelerator().synchronize()
    text = io.StringIO()
    for order in ("tottime", "cumulative"):
        pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(40)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.getvalue())


def run(args: argparse.Namespace) -> dict[str, Any]:
    import deepspeed

    accelerator = get_accelerator()
    size = sizes(args.dry_run)
    steps = args.steps or (2 if args.dry_run else 3)
    accumulation = args.accumulation or (2 if args.dry_run else 4)
    device = torch.device(accelerator.current_device_name())
    batch, seq = size["batch"], size["seq"]
    tokens_per_step = accumulation * batch * seq
    vocab = size["config"].vocab_size
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (batch, seq), generator=generator).to(device) for _ in range(accumulation)]
    deepspeed.init_distributed()
    dtype = compute_dtype(engine_config(accumulation, batch, None))
    model = random_model(size["config"], device, dtype)
    results = []

    accelerator.reset_peak_memory_stats()
    model.enable_input_require_grads()  # the frozen model's backward runs through every layer

    def no_adapter() -> None:
        for ids in batches:
            model(input_ids=ids, labels=ids).loss.backward()

    results.append(measure("no adapter (frozen forward + backward)", no_adapter, tokens_per_step, steps, model))
    model.disable_input_require_grads()

    def engine_step(engine: Any) -> Callable[[], None]:
        def step() -> None:
            for ids in batches:
                engine.backward(engine(input_ids=ids, labels=ids).loss)
                engine.step()

        return step

    from peft import LoraConfig, get_peft_model

    accelerator.reset_peak_memory_stats()
    lora = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    params = [p for p in lora.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(
        model=lora, model_parameters=params, config=engine_config(accumulation, batch, None)
    )
    results.append(measure("LoRA r=16 on q,v (ZeRO-2, optimizer offloaded)", engine_step(engine), tokens_per_step,
                           steps, model))  # fmt: skip
    model = lora.unload()
    del engine, lora, params
    accelerator.empty_cache()

    accelerator.reset_peak_memory_stats()
    overrides = parse_overrides(args.meft)
    meft = merge_settings({"num_neurons": size["neurons"], "top_k": 64}, overrides)
    engine, *_ = meft_ds.initialize(model=model, config=engine_config(accumulation, batch, meft))
    timer = WaitTimer()
    with timer.installed():
        settings = "".join(f", {key}={value}" for key, value in overrides.items())
        label = f"MEFT r={meft['num_neurons']}, K={meft['top_k']}{settings} (ZeRO-2, routers' optimizer offloaded)"
        results.append(measure(label, engine_step(engine), tokens_per_step, steps, model))
        waits = timer.milliseconds()
    results[-1]["device_wait_ms_per_layer"] = {
        "median": statistics.median(waits),
        "p90": sorted(waits)[int(0.9 * (len(waits) - 1))],
        "calls": len(waits),
        "what": "device idle, waiting for the host" if accelerator.Event is not None else "host seconds (no events)",
    }
    host = {"seconds": timeline.timed_steps(engine_step(engine), steps), "steps": steps * accumulation}
    results[-1]["host_timeline"] = host | {"layers": len(meft_ds.adapters(model))}
    if args.profile:
        profile(engine_step(engine), steps, args.out / "gpu_profile.txt")
    generated = gpu_generate.generation(model, vocab, device, args.dry_run)
    floor = results[0]["tokens_per_s"]
    for result in results:
        result["speed_vs_no_adapter"] = result["tokens_per_s"] / floor
    return {
        "model": size["model"],
        "device": accelerator.device_name() if accelerator.device_name() == "cpu" else torch.cuda.get_device_name(),
        "dry_run": args.dry_run,
        "dtype": str(dtype).removeprefix("torch."),
        "micro_batch": f"{batch} x {seq}",
        "accumulation": accumulation,
        "timed_steps": steps,
        "command": " ".join(
            ["python launch/gpu_bench.py", *(["--dry-run"] * args.dry_run), *(f"--meft {pair}" for pair in args.meft)]
        ),
        "results": results,
        "generation": generated,
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"GPU check benchmark on {report['device']}: {report['model']}, {report['dtype']}, "
        f"micro-batch {report['micro_batch']}, "
        f"{report['accumulation']} micro-steps per optimizer step, {report['timed_steps']} timed steps after one "
        f"warm-up; `{report['command']}`" + (" (dry run: tiny sizes, not a measurement)" if report["dry_run"] else ""),
        "",
        "| variant | tokens/s | ÷ no adapter | peak device GiB | host->device / step | device->host / step "
        "| device wait per layer, ms (median / p90) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        wait = r.get("device_wait_ms_per_layer")
        lines.append(
            f"| {r['variant']} | {r['tokens_per_s']:.0f} | {r['speed_vs_no_adapter']:.2f} | {r['peak_device_gib']:.2f} "
            f"| {fmt_bytes(r.get('bytes_to_device_per_step', 0))} | {fmt_bytes(r.get('bytes_to_host_per_step', 0))} | "
            + (f"{wait['median']:.2f} / {wait['p90']:.2f} |" if wait else "- |")
        )
    host = report["results"][-1]["host_timeline"]
    rows = timeline.table(host)
    lines += ["", f"MEFT's host work per layer and micro-step over {report['timed_steps']} more steps, ms:", ""]
    lines += ["| " + " | ".join(row[i] for i in (0, 2, 4)) + " |" for row in rows[:1]] + ["|---|---|---|"]
    lines += ["| " + " | ".join(row[i] for i in (0, 2, 4)) + " |" for row in rows[1:]]
    lines += gpu_generate.markdown(report["generation"])
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", "29517")
    report = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_bench.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "gpu_bench.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
