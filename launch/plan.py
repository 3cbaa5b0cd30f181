"""How much device, pinned-host, host and NVMe memory a meft_ds run takes, and whether it fits the device.

    python launch/plan.py --model llama-2-7b --deepspeed ds_configs/meft.json --micro_batch_size 2 --seq_len 256 \\
        --meft num_neurons=8464
    python launch/plan.py --model path/to/config.json --device_gb 24 --activation_checkpointing

--model takes a built-in name (llama-2-7b, smollm2-135m-instruct), a config.json, a folder, a .gguf file or a hub id;
no weights are loaded (the model is instantiated on PyTorch's meta device). The DeepSpeed config's bf16/fp16 "auto"
counts as enabled: a plan is for the target accelerator. Figures are GiB (2**30 bytes). Exit code 1: it does not
fit.
"""

from __future__ import annotations

import os

# before deepspeed is imported: a plan needs no accelerator (and DeepSpeed then skips probing for one)
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import argparse

from meft_ds.inject import UnsupportedModelError
from meft_ds.memory import HEADROOM
from meft_ds.models import BUILTIN_MODEL, ModelLoadError
from meft_ds.plan import CONTEXT_RESERVE, FRAGMENTATION, TIERS, GiB, MemoryPlan, plan
from meft_ds.training import parse_overrides, run_cli

TIER_NAMES = {"device": "device", "pinned": "pinned host", "host": "host (pageable)", "nvme": "NVMe"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=BUILTIN_MODEL, help="built-in name, config.json, folder, .gguf or hub id")
    parser.add_argument("--deepspeed", default="ds_configs/meft.json", help="DeepSpeed JSON config with a meft section")
    parser.add_argument("--micro_batch_size", type=int, default=2, help="sequences per micro-batch and rank")
    parser.add_argument("--seq_len", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--device_gb", type=float, default=24.0, help="device memory in GiB (default 24)")
    parser.add_argument("--host_gb", type=float, help="also check CPU memory of this size (GiB)")
    parser.add_argument("--world_size", type=int, default=1, help="data-parallel ranks (ZeRO and sharded stores)")
    parser.add_argument("--activation_checkpointing", action="store_true", help="plan with gradient checkpointing")
    parser.add_argument(
        "--union", type=int, help="rows fetched per layer and micro-step, measured (default: uniform-routing estimate)"
    )
    parser.add_argument(
        "--meft", action="append", default=[], metavar="KEY=VALUE", help="override a meft key (repeatable)"
    )
    args = parser.parse_args(argv)
    for name in ("micro_batch_size", "seq_len", "world_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("device_gb", "host_gb"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    return args


def describe(memory_plan: MemoryPlan) -> str:
    """The plan's header, its items per tier with their totals, as text."""
    s, model, m = memory_plan.setup, memory_plan.model, memory_plan.setup.meft
    offload = f", optimizer offload {s.offload}" if s.offload != "none" else ""
    lines = [
        f"model {model.name}: d={model.dim}, {model.num_layers} layers, {model.params / 1e9:.2f}B parameters; "
        f"adapters on {model.adapters} layers: r={m.num_neurons}, K={m.top_k}, E={m.num_experts}, n_probe={m.n_probe}",
        f"micro-batch {s.batch_size} x {s.seq_len} = {s.tokens} tokens; |U| ~ {memory_plan.union} rows per layer "
        f"({'uniform-routing estimate' if s.union_fraction == 1 else 'as given'}); compute {str(s.compute)[6:]}, "
        f"rows travel in {str(s.rows)[6:]}; "
        f"ZeRO stage {s.zero_stage}{offload}; {s.world_size} rank(s)",
        "",
        f"{'tier':<16} {'item':<52} {'GiB':>8}  note",
    ]
    for tier in TIERS:
        for item in (i for i in memory_plan.items if i.tier == tier):
            lines.append(f"{TIER_NAMES[tier]:<16} {item.name:<52} {item.nbytes / GiB:8.3f}  {item.note}")
    lines.append("")
    totals = ", ".join(f"{TIER_NAMES[t]} {memory_plan.total(t) / GiB:.2f}" for t in TIERS)
    lines.append(f"totals (GiB): {totals}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        memory_plan = plan(
            args.model,
            args.deepspeed,
            batch_size=args.micro_batch_size,
            seq_len=args.seq_len,
            world_size=args.world_size,
            meft=parse_overrides(args.meft),
            activation_checkpointing=args.activation_checkpointing,
            union=args.union,
        )
    except UnsupportedModelError as error:
        raise ModelLoadError(f"--model {args.model}: {error}") from error
    print(describe(memory_plan))
    verdict = memory_plan.verdict(args.device_gb, args.host_gb)
    reserve = f"{CONTEXT_RESERVE / GiB:g} GiB for the CUDA context and workspaces, {FRAGMENTATION:.0%} fragmentation"
    print(
        f"\nverdict: {'FITS' if verdict.device_fits else 'DOES NOT FIT'} a {args.device_gb:g} GiB device: needs "
        f"{verdict.need / GiB:.2f} GiB of the {verdict.budget / GiB:.2f} GiB it leaves ({reserve})"
    )
    if verdict.changes:
        print("to fit, change one of:" if not verdict.device_fits else "a narrow fit; these would free device memory:")
        for change in verdict.changes:
            print(f"  - {change}")
    if verdict.host_budget is not None:
        fix = "" if verdict.host_fits else "; to fit, lower meft.num_neurons or use meft.store.device=nvme"
        print(
            f"CPU memory: {'FITS' if verdict.host_fits else 'DOES NOT FIT'} {args.host_gb:g} GiB: needs "
            f"{verdict.host_need / GiB:.2f} GiB (pinned and pageable) of the {verdict.host_budget / GiB:.2f} GiB it "
            f"leaves ({HEADROOM:.0%}: the rest for the process's other memory){fix}"
        )
    return 0 if verdict.fits else 1


if __name__ == "__main__":
    run_cli(main)
