"""Which precision a run computes in: on a CPU, an "auto" bf16 means bf16 with AMX and fp32 without (the faster on
each), an explicit bf16 stays on where the CPU has native bf16 and is switched off loudly where it has not; fp16
follows DeepSpeed's CPU check; a GPU's config is left alone; the detection agrees with the kernel's own flags;
``compute_dtype`` reads the final choice."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from deepspeed.accelerator import get_accelerator
from tiny_models import tiny_model

import meft_ds
import meft_ds.ds_config
from meft_ds.ds_config import (
    compute_dtype,
    cpu_has_amx_bf16,
    cpu_has_native_bf16,
    fit_precision_to_cpu,
    resolve_auto,
)


def configs(enabled: object) -> dict:
    return {"bf16": {"enabled": enabled}, "fp16": {"enabled": False}}


def test_bf16_asked_for_stays_on_a_cpu_with_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(meft_ds.ds_config, "cpu_has_native_bf16", lambda: True)
    config = resolve_auto(configs(True))
    fit_precision_to_cpu(config)
    assert config["bf16"]["enabled"] is True and compute_dtype(config) == torch.bfloat16


@pytest.mark.parametrize("amx", [True, False])
def test_auto_bf16_means_bf16_on_a_cpu_with_amx_else_fp32_and_bf16_on_a_gpu(
    monkeypatch: pytest.MonkeyPatch, amx: bool
) -> None:
    monkeypatch.setattr(meft_ds.ds_config, "cpu_has_native_bf16", lambda: True)  # AVX-512 BF16 at least
    monkeypatch.setattr(meft_ds.ds_config, "cpu_has_amx_bf16", lambda: amx)
    config = resolve_auto(configs("auto"))
    fit_precision_to_cpu(config)
    assert config["bf16"]["enabled"] is amx and compute_dtype(config) == (torch.bfloat16 if amx else torch.float32)
    monkeypatch.setattr(get_accelerator(), "device_name", lambda *args: "cuda")
    monkeypatch.setattr(get_accelerator(), "is_bf16_supported", lambda: True)
    assert resolve_auto(configs("auto"))["bf16"]["enabled"] is True


@pytest.mark.parametrize("enabled", [True, "auto"])
def test_bf16_is_switched_off_loudly_without_native_bf16(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, enabled: object
) -> None:
    monkeypatch.setattr(meft_ds.ds_config, "cpu_has_native_bf16", lambda: False)
    config = configs(enabled)
    with caplog.at_level(logging.WARNING, logger="meft_ds"):
        fit_precision_to_cpu(config)
        fit_precision_to_cpu(config)  # idempotent: said once
    assert config["bf16"]["enabled"] is False and compute_dtype(config) == torch.float32
    [record] = caplog.records
    assert "bf16 switched off" in record.message and "avx512_bf16 or amx_bf16" in record.message


def test_fp16_follows_deepspeeds_cpu_check(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    accelerator = get_accelerator()
    monkeypatch.setattr(accelerator, "is_fp16_supported", lambda: True)
    supported = {"fp16": {"enabled": True}}
    fit_precision_to_cpu(supported)
    assert supported["fp16"]["enabled"] is True and compute_dtype(supported) == torch.float16

    monkeypatch.setattr(accelerator, "is_fp16_supported", lambda: None)  # DeepSpeed's check returns None on failure
    unsupported = {"fp16": {"enabled": True}}
    with caplog.at_level(logging.WARNING, logger="meft_ds"):
        fit_precision_to_cpu(unsupported)
    assert unsupported["fp16"]["enabled"] is False and "reports no fp16 support" in caplog.text


def test_a_gpu_config_is_left_as_written(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(get_accelerator(), "device_name", lambda *args: "cuda")
    monkeypatch.setattr(meft_ds.ds_config, "cpu_has_native_bf16", lambda: False)
    config = configs(True)
    fit_precision_to_cpu(config)
    assert config["bf16"]["enabled"] is True


def test_native_bf16_detection_agrees_with_the_kernel_flags() -> None:
    """py-cpuinfo's answer against the flags the Linux kernel reports for this CPU."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo to compare with")
    flags = next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split()
    assert cpu_has_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)
    assert cpu_has_amx_bf16() == ("amx_bf16" in flags)


def test_compute_dtype_needs_resolved_values() -> None:
    with pytest.raises(meft_ds.MeftConfigError, match=r"bf16.enabled: still 'auto'.*resolve_auto"):
        compute_dtype({"bf16": {"enabled": "auto"}})
    assert compute_dtype({}) == compute_dtype({"torch_autocast": {"enabled": True}}) == torch.float32
    assert compute_dtype({"bfloat16": {"enabled": True}}) == torch.bfloat16  # DeepSpeed's older name
    with pytest.raises(meft_ds.MeftConfigError, match=r"bf16: expected a JSON object"):
        compute_dtype({"bf16": True})


@pytest.mark.parametrize("native", [True, False])
def test_initialize_computes_in_the_precision_chosen_for_this_cpu(
    monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    monkeypatch.setattr(meft_ds.ds_config, "cpu_has_native_bf16", lambda: native)
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
        "bf16": {"enabled": True},
        "meft": {"num_neurons": 64, "top_k": 4},
    }
    engine, *_ = meft_ds.initialize(model=tiny_model(), config=config)
    assert engine.bfloat16_enabled() is native
    assert next(engine.module.parameters()).dtype == (torch.bfloat16 if native else torch.float32)
