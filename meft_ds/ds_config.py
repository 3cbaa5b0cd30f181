"""The DeepSpeed config as meft_ds reads it: load, resolve ``"auto"`` values, validate, fit bf16/fp16 to the CPU.

``ds_configs/meft.json`` uses ``"auto"`` for the values a training script owns (batch sizes, learning rate, schedule
length), the Hugging Face convention, so the same file works with ``launch/train.py``, the HF Trainer and
Accelerate. :func:`resolve_auto` fills them for scripts that drive DeepSpeed directly.
"""

from __future__ import annotations

import copy
import difflib
import functools
import inspect
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from deepspeed import comm as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS
from deepspeed.runtime.lr_schedules import VALID_LR_SCHEDULES

from meft_ds.config import MeftConfigError

logger = logging.getLogger("meft_ds")
AUTO = "auto"
WARMUP_FRACTION = 0.02  # SPEC.md: 2% linear warmup, then linear decay


def load_deepspeed_config(config: str | Path | dict[str, Any]) -> dict[str, Any]:
    """A deep copy of the DeepSpeed config (from a dict or a JSON file), with clear errors for a bad file."""
    if isinstance(config, dict):
        return copy.deepcopy(config)
    path = Path(config)
    if not path.is_file():
        raise MeftConfigError(f"--deepspeed {path}: no such file. Fix: pass the path of a DeepSpeed JSON config.")
    try:
        loaded = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise MeftConfigError(
            f"{path}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}). Fix: correct the file."
        ) from error
    if not isinstance(loaded, dict):
        raise MeftConfigError(f"{path}: the top level must be a JSON object. Fix: wrap the settings in {{...}}.")
    return loaded


def section(config: dict[str, Any], *path: str) -> dict[str, Any]:
    """The sub-object at ``path`` (``{}`` when absent or null); anything else than an object there is an error."""
    node: Any = config
    for depth, key in enumerate(path):
        node = node.get(key) if isinstance(node, dict) else None
        if node is None:
            return {}
        if not isinstance(node, dict):
            name = ".".join(path[: depth + 1])
            raise MeftConfigError(f'{name}: expected a JSON object, got {node!r}. Fix: write "{key}": {{...}}.')
    return node


def _fill(section: dict[str, Any], key: str, value: Any) -> None:
    if section.get(key) == AUTO:
        section[key] = value


def resolve_auto(
    ds_config: dict[str, Any],
    *,
    max_steps: int | None = None,
    lr: float = 1e-4,
    micro_batch_size: int = 8,
    gradient_accumulation_steps: int = 1,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    warmup_fraction: float = WARMUP_FRACTION,
) -> dict[str, Any]:
    """Replace ``"auto"`` values in place (SPEC.md's defaults unless given) and return the config; the scheduler's
    warmup takes ``warmup_fraction`` of ``max_steps``."""
    _fill(ds_config, "train_micro_batch_size_per_gpu", micro_batch_size)
    _fill(ds_config, "gradient_accumulation_steps", gradient_accumulation_steps)
    _fill(ds_config, "gradient_clipping", max_grad_norm)
    if ds_config.get("train_batch_size") == AUTO:
        del ds_config["train_batch_size"]  # DeepSpeed derives it from the two above and the world size
    for key, default in (("bf16", _bf16_by_default()), ("fp16", False)):
        _fill(section(ds_config, key), "enabled", default)
    optimizer_params = section(ds_config, "optimizer", "params")
    for key, value in (("lr", lr), ("betas", [0.9, 0.999]), ("eps", 1e-8), ("weight_decay", weight_decay)):
        _fill(optimizer_params, key, value)
    scheduler_params = section(ds_config, "scheduler", "params")
    if scheduler_params:
        _fill(scheduler_params, "warmup_min_lr", 0.0)
        _fill(scheduler_params, "warmup_max_lr", lr)
        uses_steps = AUTO in (scheduler_params.get("total_num_steps"), scheduler_params.get("warmup_num_steps"))
        if uses_steps and max_steps is None:
            raise MeftConfigError(
                "scheduler.params: total_num_steps / warmup_num_steps are 'auto' but the number of training steps "
                "is unknown. Fix: pass max_steps (train.py --max_steps) or write the numbers into the config."
            )
        if max_steps is not None:
            _fill(scheduler_params, "total_num_steps", max_steps)
            _fill(scheduler_params, "warmup_num_steps", max(1, math.ceil(warmup_fraction * max_steps)))
    return ds_config


def _find_auto(value: Any, path: str = "") -> str | None:
    if value == AUTO:
        return path or "<root>"
    if isinstance(value, dict):
        for key, item in value.items():
            found = _find_auto(item, f"{path}.{key}" if path else str(key))
            if found:
                return found
    return None


def validate_deepspeed_config(ds_config: dict[str, Any]) -> None:
    """The mistakes meft_ds can name before DeepSpeed starts (DeepSpeed validates the rest itself)."""
    leftover = _find_auto({key: value for key, value in ds_config.items() if key != "meft"})
    if leftover:
        raise MeftConfigError(
            f"{leftover}: still 'auto'. Fix: call meft_ds.ds_config.resolve_auto(config, ...) or write a value "
            "(train.py, the HF Trainer and Accelerate fill 'auto' values themselves)."
        )
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        value = ds_config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise MeftConfigError(f"{key}: expected a positive integer, got {value!r}. Fix: set e.g. {key}: 1.")
    clip = ds_config.get("gradient_clipping", 0.0)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0 or not math.isfinite(clip):
        raise MeftConfigError(
            f"gradient_clipping: expected a number >= 0, got {clip!r}. Fix: e.g. 1.0, or 0 to disable."
        )
    _check_batch_sizes(ds_config)
    check_optimizer(ds_config)
    scheduler_type = section(ds_config, "scheduler").get("type")
    if scheduler_type is not None and scheduler_type not in VALID_LR_SCHEDULES:
        raise MeftConfigError(
            f"scheduler.type: {scheduler_type!r} is not a DeepSpeed scheduler. Fix: use one of "
            f"{', '.join(VALID_LR_SCHEDULES)} (WarmupDecayLR is SPEC.md's warmup then linear decay)."
        )
    zero = section(ds_config, "zero_optimization")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise MeftConfigError(f"zero_optimization.stage: {stage!r} is not a ZeRO stage. Fix: use 0, 1, 2 or 3.")
    offload = section(zero, "offload_optimizer").get("device", "none")
    if offload not in ("none", "cpu", "nvme"):
        raise MeftConfigError(
            f"zero_optimization.offload_optimizer.device: {offload!r} is unknown. Fix: use 'cpu', 'nvme' or 'none'."
        )


def _check_batch_sizes(ds_config: dict[str, Any]) -> None:
    """``train_batch_size`` = micro-batch x accumulation steps x data-parallel ranks (meft_ds trains data-parallel
    only), which DeepSpeed asserts only once the model has loaded."""
    total = ds_config.get("train_batch_size")
    micro, steps = ds_config.get("train_micro_batch_size_per_gpu"), ds_config.get("gradient_accumulation_steps")
    if total is None or micro is None or steps is None:
        return  # DeepSpeed derives the missing one
    ranks = _ranks()
    if total != micro * steps * ranks:
        raise MeftConfigError(
            f"train_batch_size: {total!r} is not train_micro_batch_size_per_gpu x gradient_accumulation_steps x "
            f"ranks = {micro} x {steps} x {ranks} = {micro * steps * ranks}. Fix: set it to {micro * steps * ranks}, "
            "or to 'auto' (DeepSpeed then derives it)."
        )


def global_batch_size(ds_config: dict[str, Any]) -> int:
    """Examples per optimizer step over every rank, as DeepSpeed will take it: ``train_batch_size``, else micro-batch
    x accumulation steps x data-parallel ranks (each 1 where absent). Call it after :func:`resolve_auto`."""
    total = ds_config.get("train_batch_size")
    if total is not None:
        return total
    micro, steps = ds_config.get("train_micro_batch_size_per_gpu", 1), ds_config.get("gradient_accumulation_steps", 1)
    return micro * steps * _ranks()


def _ranks() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def check_optimizer(ds_config: dict[str, Any]) -> None:
    """The ``optimizer`` section's type and parameter names, which DeepSpeed checks only when it builds the optimizer,
    after the model has loaded ("auto" values pass: the Hugging Face Trainer fills them later)."""
    optimizer_type = section(ds_config, "optimizer").get("type")
    if optimizer_type is not None and not _known_optimizer(optimizer_type):
        raise MeftConfigError(
            f"optimizer.type: {optimizer_type!r} is neither a DeepSpeed optimizer nor one of torch.optim. Fix: use "
            f"one of {', '.join(sorted(DEEPSPEED_OPTIMIZERS))} (AdamW is the usual choice)."
        )
    _check_optimizer_params(optimizer_type, section(ds_config, "optimizer", "params"))


def _check_optimizer_params(optimizer_type: Any, params: dict[str, Any]) -> None:
    """A key of ``optimizer.params`` that the optimizer DeepSpeed builds does not take fails there with a TypeError,
    once the model has loaded. Checked for Adam/AdamW (DeepSpeed's CPU Adam, its FusedAdam or torch's, by the config;
    any of their parameters is accepted, and the keys DeepSpeed reads itself) and for torch.optim classes."""
    if not isinstance(optimizer_type, str):
        return
    if optimizer_type.lower() in ("adam", "adamw"):
        from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

        classes = [FusedAdam, DeepSpeedCPUAdam, torch.optim.AdamW]
        read_by_deepspeed = {"adam_w_mode", "torch_adam", "fp32_optimizer_states"}
    elif optimizer_type.lower() not in DEEPSPEED_OPTIMIZERS and hasattr(torch.optim, optimizer_type):
        classes, read_by_deepspeed = [getattr(torch.optim, optimizer_type)], set()
    else:
        return
    accepted = set(read_by_deepspeed)
    for cls in classes:
        parameters = inspect.signature(cls.__init__).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return
        accepted |= set(parameters) - {"self", "params", "model_params"}
    for key in params:
        if key not in accepted:
            close = difflib.get_close_matches(str(key), sorted(accepted), n=1)
            hint = "gradient_clipping at the top level" if key == "max_grad_norm" else (
                f"{close[0]!r}" if close else f"one of {', '.join(sorted(accepted))}")  # fmt: skip
            raise MeftConfigError(
                f"optimizer.params.{key}: not a parameter of {optimizer_type} as DeepSpeed builds it. Fix: remove it "
                f"(did you mean {hint}?)."
            )


def _known_optimizer(name: Any) -> bool:
    """What DeepSpeed accepts: its own optimizers (any case), or a class of torch.optim by name."""
    return isinstance(name, str) and (name.lower() in DEEPSPEED_OPTIMIZERS or hasattr(torch.optim, name))


AMX_BF16_FLAG = "amx_bf16"  # AMX's bf16 tile multiply (Intel Xeon since Sapphire Rapids)
NATIVE_BF16_FLAGS = ("avx512_bf16", AMX_BF16_FLAG)  # py-cpuinfo's names for bf16 matmul instructions


@functools.lru_cache(maxsize=1)
def _cpu_description() -> tuple[str, frozenset[str]]:
    """The CPU's name and instruction-set flags, as py-cpuinfo reads them (about a second; read once)."""
    import cpuinfo

    info = cpuinfo.get_cpu_info()
    return str(info.get("brand_raw") or info.get("arch") or "unknown CPU"), frozenset(info.get("flags", ()))


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX-BF16). Without either, bf16 matmuls are
    emulated: measured ~37x slower than fp32 on an AMD EPYC without them. Tests monkeypatch this function."""
    return bool(_cpu_description()[1].intersection(NATIVE_BF16_FLAGS))


def cpu_has_amx_bf16() -> bool:
    """Whether this CPU has AMX-BF16, with which bf16 is the faster choice on the CPU (:func:`_bf16_by_default`).
    Tests monkeypatch this function."""
    return AMX_BF16_FLAG in _cpu_description()[1]


def _bf16_by_default() -> bool:
    """What ``"bf16": {"enabled": "auto"}`` means: on an accelerator, whether it supports bf16; on a CPU, whether it
    has AMX-BF16. With AMX, bf16 is the faster choice: on an Intel Xeon with AMX (2 threads, torch 2.13) a
    (512 x 576) @ (576 x 1536) matmul ran at 1757 GFLOP/s in bf16 against 301 in fp32, and a training step of
    SmolLM2-135M (launch/train.py's demo) took 1.25 s against 1.68 with MEFT and 1.07 against 1.47 with LoRA. With
    AVX-512 BF16 alone it is the slower one: the same matmul ran at 141 GFLOP/s against 235 on an Intel Xeon with
    avx512_bf16 and no AMX, and the training step took 1.3x as long. ``"enabled": true`` gets bf16 on every CPU that
    has it natively (:func:`fit_precision_to_cpu`)."""
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        return cpu_has_amx_bf16()
    return bool(accelerator.is_bf16_supported())


# DeepSpeed's sections for reduced precision ("bfloat16" is its older name for "bf16") and the dtype each computes in
PRECISION_SECTIONS = (("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("fp16", torch.float16))
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _enabled(ds_config: dict[str, Any], key: str) -> bool:
    value = section(ds_config, key).get("enabled")
    return value is True or value == AUTO


def fit_precision_to_cpu(ds_config: dict[str, Any]) -> None:
    """Without an accelerator (DeepSpeed's CPU accelerator), keep the config's bf16 only on a CPU that computes bf16
    natively (:func:`cpu_has_native_bf16`) and its fp16 only where DeepSpeed's CPU accelerator supports fp16 (its
    own check); what is switched off is said, with the reason. Values still ``"auto"`` count as on (after
    :func:`resolve_auto`, an ``"auto"`` bf16 is already off on a CPU). Idempotent."""
    if get_accelerator().device_name() != "cpu":
        return
    for key, dtype in PRECISION_SECTIONS:
        if not _enabled(ds_config, key):
            continue
        if dtype == torch.bfloat16:
            if cpu_has_native_bf16():
                continue
            reason = (
                f"this CPU has no native bf16 ({' or '.join(NATIVE_BF16_FLAGS)}), so bf16 matmuls would be emulated "
                "(~37x slower than fp32 on an AMD EPYC without them)"
            )
        else:
            if get_accelerator().is_fp16_supported():
                continue
            reason = "DeepSpeed's CPU accelerator reports no fp16 support on this CPU"
        ds_config[key]["enabled"] = False
        logger.warning(
            "meft_ds: %s switched off, this run computes in fp32 on the CPU (%s): %s. On a GPU the config applies "
            "as written.",
            key, _cpu_description()[0], reason,
        )  # fmt: skip


def compute_dtype(ds_config: dict[str, Any]) -> torch.dtype:
    """The dtype the engine computes in: bf16 or fp16 when the config enables it, else fp32 (also under
    ``torch_autocast``, whose parameters stay fp32). Call it after :func:`resolve_auto` and
    :func:`fit_precision_to_cpu`, so that it sees the final choice."""
    for key, dtype in PRECISION_SECTIONS:
        if section(ds_config, key).get("enabled") == AUTO:
            raise MeftConfigError(f"{key}.enabled: still 'auto'. Fix: call meft_ds.ds_config.resolve_auto(config).")
        if _enabled(ds_config, key):
            return dtype
    return torch.float32


def peak_lr(ds_config: dict[str, Any]) -> float | None:
    """The dense learning rate at the top of the schedule: the scheduler's max if it names one, else the optimizer's."""
    params = section(ds_config, "scheduler", "params")
    for key in ("warmup_max_lr", "cycle_max_lr"):
        if isinstance(params.get(key), (int, float)):
            return float(params[key])
    lr = section(ds_config, "optimizer", "params").get("lr")
    return float(lr) if isinstance(lr, (int, float)) else None
