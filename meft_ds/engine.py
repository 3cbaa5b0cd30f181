"""DeepSpeed entry points. :func:`initialize` takes the same arguments and returns the same values as
``deepspeed.initialize``: it reads the ``"meft"`` section of the DeepSpeed config, injects the adapters, gives the
engine the dense trainable parameters (the routers) and :func:`attach`-es a :class:`meft_ds.plugin.MeftPlugin`, which
steps, clips and saves the row stores with the engine. ``attach`` alone serves engines created elsewhere (the Hugging
Face Trainer, Accelerate, an existing ``deepspeed.initialize`` call).
"""

from __future__ import annotations

import logging
from argparse import Namespace
from pathlib import Path
from typing import Any

import deepspeed
import torch
from deepspeed import comm as dist
from torch import nn

from meft_ds.config import MeftConfig, MeftConfigError
from meft_ds.distributed import unlink_cpu_allreduce_buffer
from meft_ds.ds_config import (
    fit_precision_to_cpu,
    load_deepspeed_config,
    peak_lr,
    resolve_auto,
    section,
    validate_deepspeed_config,
)
from meft_ds.export import without_meft_wrapper
from meft_ds.inject import adapters, inject, warn_settings_not_used
from meft_ds.ops import check_build_locks
from meft_ds.plugin import MeftPlugin
from meft_ds.sparse_adam import SparseRowAdam

logger = logging.getLogger("meft_ds")


def initialize(
    args: Any = None,
    model: nn.Module | None = None,
    optimizer: Any = None,
    model_parameters: Any = None,
    training_data: Any = None,
    lr_scheduler: Any = None,
    config: str | Path | dict[str, Any] | None = None,
    *,
    meft: MeftConfig | dict[str, Any] | None = None,
    **kwargs: Any,
) -> tuple[Any, Any, Any, Any]:
    """``deepspeed.initialize`` with meft_ds adapters: same arguments, same return values.

    The ``"meft"`` section comes from ``meft=`` (a dict or :class:`MeftConfig`) or from the DeepSpeed config (a
    path or dict, passed as ``config=`` or ``args.deepspeed_config``). The model gets adapters unless it has them;
    ``model_parameters`` made before the call are fitted to them (:func:`parameters_for_engine`). A
    :class:`MeftModel` is taken as the model it wraps.
    """
    if model is None:
        raise MeftConfigError("initialize: model is required. Fix: pass model=your_model.")
    model = without_meft_wrapper(model)
    source = config if config is not None else kwargs.pop("config_params", None)
    if source is None and getattr(args, "deepspeed_config", None):
        source = args.deepspeed_config
    if source is None:
        raise MeftConfigError(
            "initialize: no DeepSpeed config. Fix: pass config='ds_configs/meft.json' (or a dict), or "
            "args with deepspeed_config set."
        )
    if args is not None and getattr(args, "deepspeed_config", None) is not None:
        args = Namespace(**{**vars(args), "deepspeed_config": None})  # the config goes in as a dict below
    ds_config = load_deepspeed_config(source)
    meft_config = MeftConfig.from_dict(meft if meft is not None else ds_config.get("meft"))
    resolve_auto(ds_config)
    validate_deepspeed_config(ds_config)
    rows_lr_scale(meft_config, ds_config)  # refused here, before the engine is built, as well as at attach
    fit_precision_to_cpu(ds_config)
    check_build_locks()  # DeepSpeed builds its CPU Adam in deepspeed.initialize, before meft_ds's kernels load

    if not adapters(model):
        deepspeed.init_distributed()  # a sharded store partitions rows across the ranks as it is built
        inject(model, meft_config)
    elif meft is not None or "meft" in ds_config:
        warn_settings_not_used(model, meft_config, from_argument=meft is not None)
    if isinstance(optimizer, torch.optim.Optimizer):  # (else None, made from the config, or a callable)
        check_optimizer_has_routers(model, [p for g in optimizer.param_groups for p in g["params"]], "initialize")
    model_parameters = parameters_for_engine(model, model_parameters)
    engine, engine_optimizer, loader, scheduler = deepspeed.initialize(
        args=args, model=model, optimizer=optimizer, model_parameters=model_parameters, training_data=training_data,
        lr_scheduler=lr_scheduler, config=ds_config, **kwargs,
    )  # fmt: skip
    attach(engine)
    return engine, engine_optimizer, loader, scheduler


def parameters_for_engine(model: nn.Module, model_parameters: Any) -> Any:
    """The ``model_parameters`` to build the engine with: the model's trainable ones when none are given, else those
    given (parameters, or groups as dicts) made to agree with the model as it now is. A list made before the adapters
    existed (``[p for p in model.parameters() if p.requires_grad]``, or weight-decay groups, made before calling
    :func:`initialize`) holds the base model's parameters, which inject froze, and not the routers: ZeRO-1/2 then
    failed on a group of frozen parameters (IndexError), and without ZeRO the routers never trained. Frozen parameters
    are taken out (a group left empty is dropped) and the missing trainable ones added, in a group of their own where
    the parameters come in groups."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if model_parameters is None:
        return trainable
    given = list(model_parameters)
    grouped = bool(given) and all(isinstance(item, dict) for item in given)
    groups = [dict(group, params=list(group["params"])) for group in given] if grouped else [{"params": given}]
    if not all(isinstance(p, nn.Parameter) for group in groups for p in group["params"]):
        return given  # named parameters or another form: DeepSpeed's to read as it is
    listed = {id(p) for group in groups for p in group["params"]}
    missing = [p for p in trainable if id(p) not in listed]
    for group in groups:
        group["params"] = [p for p in group["params"] if p.requires_grad]
    if missing:
        logger.warning(
            "meft_ds: model_parameters lacks %d trainable parameters (the routers meft_ds added: the list was made "
            "before the adapters existed); they are added%s. To choose their group, make the list after "
            "meft_ds.inject(model, settings).",
            len(missing), ", as a group of their own with the optimizer's settings" if grouped else "",
        )  # fmt: skip
    if not grouped:
        return groups[0]["params"] + missing
    return [group for group in groups if group["params"]] + ([{"params": missing}] if missing else [])


def check_optimizer_has_routers(model: nn.Module, optimized: list[torch.Tensor], where: str) -> None:
    """A :class:`MeftConfigError` naming the layers whose trainable routers are not among ``optimized`` (the
    parameters an optimizer steps): an optimizer made before the adapters existed lacks them, and they would never
    train. Judged only where ``optimized`` holds some of the model's parameters (an optimizer that holds flat copies
    cannot tell)."""
    listed = {id(p) for p in optimized}
    if not listed & {id(p) for p in model.parameters()}:
        return
    layers = [
        a.layer_index for a in adapters(model) if a.router.weight.requires_grad and id(a.router.weight) not in listed
    ]
    if layers:
        raise MeftConfigError(
            f"{where}: the optimizer lacks the routers of layers {layers} (it was made before meft_ds.inject added "
            "them), so they would never train. Fix: create the optimizer after meft_ds.inject(model, settings), or "
            'leave it to the DeepSpeed config\'s "optimizer" section (meft_ds.initialize also takes a callable, '
            "lambda params: torch.optim.AdamW(params, ...))."
        )


def _engine_optimized(optimizer: Any) -> list[torch.Tensor]:
    """The model parameters an engine's optimizer steps: ZeRO stages 1-2 keep them in ``bit16_groups``, stage 3 and
    DeepSpeed's fp16/bf16 optimizer without ZeRO in ``fp16_groups``, a torch optimizer in its ``param_groups``."""
    for name in ("bit16_groups", "fp16_groups", "bf16_groups"):
        groups = getattr(optimizer, name, None)
        if groups is not None:
            return [p for group in groups for p in group]
    return [p for group in getattr(optimizer, "param_groups", []) for p in group["params"]]


def attach(engine: Any) -> MeftPlugin:
    """Attach meft_ds to a DeepSpeed engine whose model already has adapters (:func:`meft_ds.inject`).

    For engines created elsewhere: the Hugging Face Trainer's, Accelerate's, or your own ``deepspeed.initialize``.
    The sparse Adam takes its hyperparameters from the model's meft settings, else from the engine's DeepSpeed config.
    Attaching twice returns the plugin already attached.
    """
    if isinstance(getattr(engine, "meft", None), MeftPlugin):
        return engine.meft
    model_adapters = adapters(engine.module)
    if not model_adapters:
        raise MeftConfigError(
            "attach: the engine's model has no meft adapters. Fix: call meft_ds.inject(model, config) before "
            "creating the engine, or use meft_ds.initialize in place of deepspeed.initialize."
        )
    frozen = [a.layer_index for a in model_adapters if not a.router.weight.requires_grad]
    if frozen:
        logger.warning(
            "meft_ds: the routers of layers %s do not require gradients, so the engine will not train them (PEFT's "
            "get_peft_model freezes every parameter it did not add). Fix: inject after get_peft_model "
            "(meft_ds.inject(peft_model, settings)), or set router.requires_grad_(True) on meft_ds.adapters(model) "
            "before the engine is made.",
            frozen,
        )
    check_optimizer_has_routers(engine.module, _engine_optimized(engine.optimizer), "attach")
    if dist.is_initialized():
        data_parallel, world = dist.get_world_size(group=engine.data_parallel_group), dist.get_world_size()
        if data_parallel != world:
            raise MeftConfigError(
                f"attach: the engine's data-parallel group holds {data_parallel} of the {world} ranks (tensor, "
                "pipeline or sequence parallelism), but meft_ds replicates or shards its row stores over every rank. "
                "Fix: train data-parallel only (any ZeRO stage), without an mpu."
            )
    config = engine.config if isinstance(engine.config, (dict, str, Path)) else {}
    ds_config = load_deepspeed_config(config)
    meft_config = model_adapters[0].config
    sparse = build_sparse_optimizer(engine.module, meft_config, ds_config)
    lr_scale = rows_lr_scale(meft_config, ds_config)
    unlink_cpu_allreduce_buffer()  # a DeepSpeed leak on CPUs, 67 MB per rank and run
    return MeftPlugin(engine, sparse, lr_scale=lr_scale).attach()


def rows_lr_scale(meft_config: MeftConfig, ds_config: dict[str, Any]) -> float | None:
    """``meft.lr`` over the engine's peak learning rate: the rows follow the engine's schedule scaled by it (``None``:
    no ``meft.lr``, the rows take the engine's rate). Without a peak rate in the config, or with a peak of 0, there is
    nothing to scale, and a ``meft.lr`` that would be ignored is refused."""
    lr = meft_config.lr
    if lr is None:
        return None
    peak = peak_lr(ds_config)
    if peak:
        return lr / peak
    if lr == 0:
        return 0.0
    unnamed = "this DeepSpeed config names none (scheduler.params.warmup_max_lr or cycle_max_lr, optimizer.params.lr)"
    why = unnamed if peak is None else "that peak is 0 here: the rows would not train"
    fix = "set one of them" if peak is None else "give the engine a nonzero learning rate"
    raise MeftConfigError(
        f"meft.lr = {lr:g}: the rows follow the engine's learning-rate schedule, scaled by meft.lr over its peak "
        f"rate, and {why}. Fix: {fix}, or drop meft.lr (the rows then take the engine's rate)."
    )


def build_sparse_optimizer(model: nn.Module, meft_config: MeftConfig, ds_config: dict[str, Any]) -> SparseRowAdam:
    """The sparse Adam: hyperparameters from the meft section, else from the DeepSpeed optimizer's params."""
    params = section(ds_config, "optimizer", "params")
    settings: dict[str, Any] = {}
    for key in ("lr", "betas", "eps", "weight_decay"):
        value = getattr(meft_config, key)
        if value is None and key in params:
            value = tuple(params[key]) if key == "betas" else params[key]
        if value is not None:
            settings[key] = value
    return SparseRowAdam(
        adapters(model), **settings, max_nonfinite_steps=meft_config.max_nonfinite_steps,
        bias_correction=meft_config.bias_correction,
    )  # fmt: skip
