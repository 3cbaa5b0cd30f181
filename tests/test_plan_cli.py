"""meft_ds.plan on LLaMA-2-7B and its CLI (launch/plan.py): the figures, the training bytes against where DeepSpeed
really keeps gradients under ZeRO 1, 2 and 3, the verdict and its changes, bad input."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from launch_scripts import launch_script
from tiny_models import tiny_model, token_batch

import meft_ds
from meft_ds.ds_config import load_deepspeed_config
from meft_ds.memory import HEADROOM
from meft_ds.plan import (
    CONTEXT_RESERVE,
    FRAGMENTATION,
    TIGHT,
    GiB,
    MemoryPlan,
    dense_trainable_items,
    device_training_bytes,
    plan,
    plan_items,
)
from meft_ds.training import run_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cli() -> Any:
    return launch_script("plan")


@pytest.fixture(scope="module")
def llama_plan() -> MemoryPlan:
    return plan("llama-2-7b", ROOT / "ds_configs" / "meft.json", batch_size=2, seq_len=256, meft={"num_neurons": 8464})


def test_llama_2_7b_figures(llama_plan: MemoryPlan) -> None:
    assert llama_plan.model.params == 6_738_415_616  # LLaMA-2-7B's published parameter count
    assert llama_plan.bytes_of("frozen base model") == 2 * 6_738_415_616 + 2 * 64 * 4  # bf16, + rotary inv_freq
    assert llama_plan.setup.compute == torch.bfloat16 and llama_plan.setup.meft.num_experts == 368
    assert 8000 < llama_plan.union <= 8464
    assert llama_plan.bytes_of("fetched rows") == 32 * llama_plan.union * 2 * 4096 * 2


def test_training_bytes_are_the_trainable_state_on_the_device(llama_plan: MemoryPlan) -> None:
    # what train.py reports as a run's device-resident training bytes: the rows fetched and kept for backward, the
    # routers' bf16 weights, one router's gradient and DeepSpeed's offload buffer of that size (ZeRO-2 with offload:
    # the others pass through the bucket to the CPU) and the bucket (the routers' optimizer states are offloaded)
    experts = llama_plan.setup.meft.num_experts
    routers = 32 * experts * 4096
    expected = llama_plan.bytes_of("fetched rows") + routers * 2 + 2 * experts * 4096 * 2
    assert device_training_bytes(llama_plan.items) == expected + llama_plan.bytes_of("ZeRO gradient bucket")
    # the same accounting for a dense trainable set (LoRA, a dense adapter, every weight): 12M parameters in bf16, at
    # most 1M in one tensor, at ZeRO-2 on 2 ranks, optimizer states on the device (fp32 master, fp32 gradient
    # partition, 2 moments; a bf16 gradient partition) or offloaded (to pinned CPU memory, as meft.json asks; one
    # tensor's gradient outside the bucket and an offload buffer of its size)
    s = dataclasses.replace(llama_plan.setup, world_size=2, offload="none", bucket=0)
    on_device = dense_trainable_items("lora", 12_000_000, s, largest=1_000_000)
    assert device_training_bytes(on_device) == 12_000_000 * (2 + 2 // 2) + 12_000_000 * (8 + 4) // 2
    offloaded = dense_trainable_items("lora", 12_000_000, dataclasses.replace(s, offload="cpu"), largest=1_000_000)
    assert device_training_bytes(offloaded) == 12_000_000 * 2 + 2 * 1_000_000 * 2
    assert [i.tier for i in offloaded] == ["device"] * 3 + ["pinned"] and offloaded[3].nbytes == 12_000_000 * 16 // 2
    # ZeRO-1 keeps every gradient on the device until the boundary (and, offloaded, the offload buffer)
    stage1 = dataclasses.replace(s, zero_stage=1)
    on_device = dense_trainable_items("lora", 12_000_000, stage1, 1_000_000)
    assert device_training_bytes(on_device) == 12_000_000 * (2 + 2) + 12_000_000 * (8 + 4) // 2
    offloaded = dense_trainable_items("lora", 12_000_000, dataclasses.replace(stage1, offload="cpu"), 1_000_000)
    assert device_training_bytes(offloaded) == 12_000_000 * (2 + 2) + 1_000_000 * 2
    # ZeRO-3 partitions the gradients like ZeRO-2 (offloaded: the largest tensor's only, and no offload buffer), and
    # keeps one bucket where ZeRO-1/2 with overlap_comm keep two
    stage3 = dataclasses.replace(s, zero_stage=3, bucket=1000, overlap_comm=True)
    on_device = dense_trainable_items("lora", 12_000_000, stage3, 1_000_000)
    assert device_training_bytes(on_device) == 12_000_000 * (2 + 2 // 2) + 12_000_000 * (8 + 4) // 2 + 1000 * 2
    offloaded = dense_trainable_items("lora", 12_000_000, dataclasses.replace(stage3, offload="cpu"), 1_000_000)
    assert device_training_bytes(offloaded) == 12_000_000 * 2 + 1_000_000 * 2 + 1000 * 2
    stage2 = dataclasses.replace(stage3, zero_stage=2, offload="cpu")
    assert dense_trainable_items("lora", 12_000_000, stage2, 1_000_000)[-1].nbytes == 2 * 1000 * 2  # two buckets


def after_a_backward(zero: dict[str, Any]) -> tuple[Any, list[torch.nn.Parameter]]:
    """An engine of the tiny model with these ZeRO settings (a 1000-element bucket) after one backward that is not an
    accumulation boundary, and its routers' weights."""
    config = {
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "zero_optimization": {**zero, "reduce_bucket_size": 1000}, "meft": {"num_neurons": 64, "top_k": 4},
    }  # fmt: skip
    model = tiny_model()
    engine, *_ = meft_ds.initialize(model=model, config=config)
    batch = token_batch(batch=2, length=12, seed=1)
    engine.backward(engine(batch, labels=batch).loss)
    return engine, [a.router.weight for a in meft_ds.adapters(model)]


@pytest.mark.parametrize(("stage", "resident"), [(1, True), (2, False)])
def test_deepspeed_keeps_gradients_where_the_plan_counts_them(stage: int, resident: bool) -> None:
    """The fact dense_trainable_items counts on, from DeepSpeed itself: under ZeRO-Offload, after a backward that is
    not the boundary, ZeRO-2 has sent every router gradient on to the CPU (param.grad is None) while ZeRO-1 still
    holds them all on the device; both keep a device buffer of the largest tensor's size for the offload."""
    engine, routers = after_a_backward({"stage": stage, "offload_optimizer": {"device": "cpu"}})
    assert routers and all((weight.grad is not None) == resident for weight in routers)
    assert engine.optimizer.temp_grad_buffer_for_gpu_offload.numel() == max(weight.numel() for weight in routers)


@pytest.mark.parametrize("offload", ["cpu", "none"])
def test_zero_3_keeps_gradients_where_the_plan_counts_them(offload: str) -> None:
    """ZeRO-3, from DeepSpeed itself: after a backward that is not the boundary no router has a gradient of its own
    (each went through the bucket into the optimizer's gradient partition: on the CPU under ZeRO-Offload, on the
    device otherwise), there is one bucket although overlap_comm is on, and no offload buffer."""
    engine, routers = after_a_backward({"stage": 3, "offload_optimizer": {"device": offload}, "overlap_comm": True})
    optimizer = engine.optimizer
    assert routers and all(weight.grad is None for weight in routers)
    assert optimizer.grad_partitions_flat_buffer.numel() == sum(weight.ds_numel for weight in routers)
    assert optimizer.offload_optimizer == (offload == "cpu")  # where that partition lives: optimizer.device
    assert [bucket.buffer.numel() for bucket in optimizer.ipg_buckets.values()] == [1000]
    assert not hasattr(optimizer, "temp_grad_buffer_for_gpu_offload")


def test_verdict_changes_are_computed_and_fit(llama_plan: MemoryPlan) -> None:
    """On a smaller card the plan does not fit; each change it proposes as fitting does, and a suggested
    num_neurons is the largest multiple of K that fits."""
    verdict = llama_plan.verdict(device_gib=20)
    assert not verdict.fits and verdict.need == llama_plan.total("device")
    suggested = next(c for c in verdict.changes if c.startswith("set meft.num_neurons="))
    neurons = int(suggested.split("=")[1].split(":")[0])

    def device(num_neurons: int) -> int:
        meft = meft_ds.MeftConfig(num_neurons=num_neurons, top_k=64)
        items = plan_items(dataclasses.replace(llama_plan.setup, meft=meft), llama_plan.model)
        return sum(i.nbytes for i in items if i.tier == "device")

    assert device(neurons) <= verdict.budget < device(neurons + 64)
    checkpointed = dataclasses.replace(llama_plan.setup, checkpointing=True)
    fits = sum(i.nbytes for i in plan_items(checkpointed, llama_plan.model) if i.tier == "device") <= verdict.budget
    assert any(c.startswith("enable activation checkpointing") and ("(fits)" in c) == fits for c in verdict.changes)


def test_a_narrow_fit_lists_what_frees_memory_without_shrinking_the_run() -> None:
    """Within 5% of the budget the plan fits, and its verdict lists changes that keep the micro-batch and the rows:
    checkpointing, a gradient bucket of the routers' size (this one is 10x larger), no device row cache."""
    config = load_deepspeed_config(ROOT / "ds_configs" / "meft.json")
    config["zero_optimization"]["reduce_bucket_size"] = 500_000_000
    narrow = plan("llama-2-7b", config, batch_size=2, seq_len=256, meft={"num_neurons": 8464, "cache_mb": 256})
    need = narrow.total("device")
    device_gib = (need / 0.97 + CONTEXT_RESERVE) / (1 - FRAGMENTATION) / GiB  # the plan needs 97% of the budget
    verdict = narrow.verdict(device_gib=device_gib)
    assert verdict.fits and verdict.need > TIGHT * verdict.budget
    starts = ["enable activation checkpointing", "set zero_optimization.reduce_bucket_size=", "set meft.cache_mb=0"]
    assert [next(c for c in verdict.changes if c.startswith(start)) for start in starts]
    assert len(verdict.changes) == len(starts)  # no smaller micro-batch or fewer rows: the run fits as it is
    for change in verdict.changes:
        assert float(change.split("device ")[1].split(" GiB")[0]) * GiB < need and change.endswith("(fits)")


def test_cpu_memory_is_judged_apart_from_the_device(llama_plan: MemoryPlan) -> None:
    """A run whose rows do not fit the CPU's memory does not fit, but its device still does: no device change is
    proposed for it (they said "(fits)" while the run did not)."""
    host = llama_plan.total("pinned") + llama_plan.total("host")
    roomy = llama_plan.verdict(device_gib=80, host_gib=2 * host / GiB)
    assert roomy.fits and roomy.host_fits and roomy.host_need == host and roomy.changes == []
    short = llama_plan.verdict(device_gib=80, host_gib=host / GiB)  # a tenth of it is left to everything else
    assert short.device_fits and not short.host_fits and not short.fits and short.changes == []
    assert short.host_budget == int(host * HEADROOM)
    assert llama_plan.verdict(device_gib=80).host_budget is None  # no size given: not judged


def test_cli_says_which_memory_does_not_fit(cli: Any, llama_plan: MemoryPlan, capsys: Any) -> None:
    host = (llama_plan.total("pinned") + llama_plan.total("host")) / GiB
    argv = ["--model", "llama-2-7b", "--deepspeed", str(ROOT / "ds_configs" / "meft.json"), "--micro_batch_size", "2"]
    code = cli.main([*argv, "--seq_len", "256", "--meft", "num_neurons=8464", "--device_gb", "80", "--host_gb", "8"])
    out = capsys.readouterr().out
    assert code == 1 and "verdict: FITS a 80 GiB device" in out
    assert (
        f"CPU memory: DOES NOT FIT 8 GiB: needs {host:.2f} GiB (pinned and pageable) of the 7.20 GiB it leaves (90%: "
        in out
    )
    assert "lower meft.num_neurons or use meft.store.device=nvme" in out


def test_checkpointing_is_planned_without_pre_retrieval() -> None:
    # the recomputed forward cannot choose pre-retrieved rows again (meft_ds.inject refuses it at run time)
    config = ROOT / "ds_configs" / "meft.json"
    shape = {"batch_size": 4, "seq_len": 256, "meft": {"num_neurons": 8464, "prefetch_layers": 1}}
    with pytest.raises(meft_ds.MeftConfigError, match=r"^meft\.prefetch_layers: 1 pre-retrieves .* Fix: set"):
        plan("llama-2-7b", config, activation_checkpointing=True, **shape)
    changes = plan("llama-2-7b", config, **shape).verdict().changes
    assert any(c.startswith("enable activation checkpointing") and "with meft.prefetch_layers=0" in c for c in changes)


def test_cli_prints_the_llama_2_7b_table_and_verdict(cli: Any, llama_plan: MemoryPlan, capsys: Any) -> None:
    argv = ["--model", "llama-2-7b", "--deepspeed", str(ROOT / "ds_configs" / "meft.json"), "--micro_batch_size", "2"]
    code = cli.main([*argv, "--seq_len", "256", "--meft", "num_neurons=8464"])
    out = capsys.readouterr().out
    verdict = llama_plan.verdict(24)
    assert code == (0 if verdict.fits else 1)
    assert f"needs {verdict.need / GiB:.2f} GiB" in out and "verdict: " in out
    assert "fetched rows kept for backward" in out and f"|U| = {llama_plan.union}" in out


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--model", "no/such/config.json"], "--model no/such/config.json"),
        (["--model", "llama-2-7b", "--meft", "num_neuron=8464"], "meft.num_neuron"),
        (["--model", "llama-2-7b", "--deepspeed", "missing.json"], "--deepspeed missing.json"),
    ],
)
def test_cli_bad_input_is_one_error_line(cli: Any, capsys: Any, argv: list[str], field: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: cli.main(argv))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"error: {field}") and "Fix:" in err


def test_cli_interrupted_is_one_line_and_exit_code_130(capsys: Any) -> None:
    """Ctrl-C while a launcher loads or evaluates (train.py's training loop says more: test_launcher.py)."""

    def main() -> int:
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        run_cli(main)
    assert exit_info.value.code == 130 and capsys.readouterr().err.strip() == "interrupted"


@pytest.mark.parametrize("argv", [["--device_gb", "0"], ["--host_gb", "-1"], ["--world_size", "0"]])
def test_cli_sizes_out_of_range_are_refused_while_parsing(cli: Any, capsys: Any, argv: list[str]) -> None:
    """A negative --host_gb gave a plan: "DOES NOT FIT a 24 GiB device" for a device it fitted."""
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(["--model", "llama-2-7b", *argv])
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .endswith(
            f"error: {argv[0]} must be "
            + ("at least 1, got 0" if argv[0] == "--world_size" else f"positive, got {float(argv[1])}")
        )
    )


class Device:
    """An accelerator as far as the launcher's memory check asks: its name and memory."""

    def __init__(self, name: str, gib: float) -> None:
        self.name, self.gib = name, gib

    def device_name(self) -> str:
        return self.name

    def total_memory(self) -> int:
        return int(self.gib * GiB)


def test_the_launcher_warns_before_loading_a_run_its_device_cannot_hold() -> None:
    """launch/train.py on an accelerator: LLaMA-2-7B at the launcher's default micro-batch (8 x 256 tokens) does not
    fit 24 GiB without activation checkpointing, says so with the plan's changes, and fits 80 GiB; on a CPU (the
    store checks the host's memory) and for the baselines nothing is said."""
    train = launch_script("train_args")
    args = train.parse_args(["--model", "llama-2-7b"])
    ds_config = load_deepspeed_config(ROOT / "ds_configs" / "meft.json")
    train.fill_auto(ds_config, args, max_steps=args.max_steps)
    ds_config["bf16"]["enabled"] = True  # what "auto" gives on a GPU
    memory_plan = plan("llama-2-7b", ds_config, batch_size=8, seq_len=256)
    need, budget = memory_plan.total("device") / GiB, memory_plan.verdict(24).budget / GiB
    warning = train.device_memory_warning(args, ds_config, Device("cuda", 24), world_size=1)
    assert need > budget and warning.startswith(
        f"meft_ds: the memory plan puts this run at {need:.2f} GiB of device memory, more than the {budget:.2f} GiB a "
        "24 GiB device leaves it: expect it to run out of memory. Fix: change one of (python launch/plan.py for the "
        "whole plan):\n  - enable activation checkpointing (launch/train.py --activation_checkpointing"
    )
    assert train.device_memory_warning(args, ds_config, Device("cuda", 80), world_size=1) is None
    assert train.device_memory_warning(args, ds_config, Device("cpu", 24), world_size=1) is None
    lora = train.parse_args(["--model", "llama-2-7b", "--method", "lora"])
    assert train.device_memory_warning(lora, ds_config, Device("cuda", 24), world_size=1) is None
