"""`MeftPlugin`: steps, clips and saves the row stores together with a DeepSpeed engine (attached by
:func:`meft_ds.initialize` or :func:`meft_ds.attach`, :mod:`meft_ds.engine`). It wraps these engine methods:

* ``engine.backward()`` (and ``engine.scale()``): measure the factor the engine multiplies the loss by (the fp16
  loss scale, whichever DeepSpeed optimizer or ``torch_autocast`` GradScaler applies it), so that the rows'
  gradients, which carry it too, can be unscaled exactly as the engine unscales its own.
* ``engine.step()``: at a gradient-accumulation boundary, average the rows' gradients over data-parallel ranks, unscale
  them, clip them (``meft.clip_rows``; by default one global norm over the engine's gradients and the rows'
  gradients, after which the engine's own clipping, which sees only its parameters, finds nothing left to clip), let
  the engine step, then (only if the engine applied its step) run the sparse Adam on the touched rows with the
  learning rate the engine's scheduler gave this step; a skipped step drops the row gradients. Under fp16 an
  overflow in the rows' gradients is an overflow of the step: the engine is told so, skips its step and lowers its
  loss scale, as for an overflow of its own gradients.
* ``engine.save_checkpoint()`` / ``engine.load_checkpoint()``: the row stores (rows, moments, step) travel with
  every checkpoint, the frozen base model does not (a sample of it does: resuming on other weights is refused), and a
  checkpoint is published atomically (see :mod:`meft_ds.files`). ``engine.module_state_dict()`` leaves a tied frozen
  weight out under each of its names.
* ``engine.get_global_grad_norm()``: the norm before clipping includes the rows' gradients
  (:meth:`MeftPlugin.global_grad_norm`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from deepspeed import comm as dist
from deepspeed.utils import safe_get_full_grad, safe_set_full_grad
from torch import nn

from meft_ds.checkpoint import (
    STORE_DIR,
    base_sample,
    check_base_sample,
    check_has_stores,
    check_stores,
    check_world_size,
    has_base_sample,
    load_stores,
    save_base_sample,
    save_stores,
    tag_to_load,
)
from meft_ds.distributed import (
    clip_coefficient,
    exchange_row_grads,
    row_grad_squared_norm,
    scale_row_grads,
    squared_norm,
)
from meft_ds.export import save_adapter
from meft_ds.files import atomic_file, publish_directory, recover_directory
from meft_ds.sparse_adam import SparseRowAdam
from meft_ds.store import CheckpointError

logger = logging.getLogger("meft_ds")
# the methods by which DeepSpeed's fp16 optimizers decide that a step overflowed: ``has_overflow`` on ZeRO 1-3's
# optimizers and on the ``overflow_checker`` of ZeRO stage 0's FP16_Optimizer / FP16_UnfusedOptimizer (which also
# has ``check_using_norm`` for its legacy fused path)
OVERFLOW_CHECKS = ("has_overflow", "check_using_norm")


@contextlib.contextmanager
def overflow_reported(optimizer: Any) -> Iterator[None]:
    """While open, the fp16 ``optimizer``'s overflow checks answer True (after running as usual, so that their
    collectives pair with the other ranks' and their trackers reset): its step is skipped and its dynamic loss scale
    lowered, exactly as for an overflow of its own gradients. Every rank must open it for the same step."""
    patched = []
    for owner in (optimizer, getattr(optimizer, "overflow_checker", None)):
        for name in OVERFLOW_CHECKS:
            check = getattr(owner, name, None) if owner is not None else None
            if not callable(check):
                continue

            def report_overflow(*args: Any, _check: Any = check, **kwargs: Any) -> bool:
                _check(*args, **kwargs)
                return True

            patched.append((owner, name, vars(owner).get(name)))
            setattr(owner, name, report_overflow)
    try:
        yield
    finally:
        for owner, name, own in reversed(patched):
            if own is None:
                delattr(owner, name)  # the class's method shows through again
            else:
                setattr(owner, name, own)


class MeftPlugin:
    """Steps the row stores together with a DeepSpeed engine (see the module docstring).

    Attributes:
        sparse_optimizer: the :class:`SparseRowAdam` over the model's adapters.
        last_grad_norm: the gradient norm of the last boundary, before clipping (unscaled): engine + rows when
            clipping with ``clip_rows="global"``, else the rows' alone; ``engine.get_global_grad_norm()`` is always
            engine + rows.
        last_lr: the learning rate the last sparse step used.
        last_loss_scale: the loss scale the last boundary's gradients carried (1 unless fp16).
        skipped_steps / row_overflow_steps: boundaries the engine skipped / of those, fp16 overflows of the rows.
    """

    def __init__(
        self,
        engine: Any,
        sparse_optimizer: SparseRowAdam,
        *,
        lr_scale: float | None = None,
    ) -> None:
        self.engine = engine
        self.sparse_optimizer = sparse_optimizer
        self.adapters = sparse_optimizer.adapters
        self.lr_scale = lr_scale
        self.last_grad_norm: float | None = None
        self.last_lr: float | None = None
        self.last_loss_scale = 1.0  # the loss scale the last boundary's gradients carried (measured; 1 unless fp16)
        self.skipped_steps = 0  # boundaries whose step the engine skipped (overflows, the rows' included)
        self.row_overflow_steps = 0  # of those, fp16 boundaries skipped because the rows' gradients overflowed
        # d(what the engine backpropagates) / d(the loss it was given), measured at the last backward, and what of it
        # is the gradient-accumulation average rather than the loss scale
        self._loss_grad: torch.Tensor | None = None
        self._loss_grad_average = 1.0
        self._engine_step = engine.step
        self._engine_backward = engine.backward
        self._engine_scale = getattr(engine, "scale", None)  # DeepSpeed >= 0.18: engine.scale(loss).backward()
        self._engine_save = engine.save_checkpoint
        self._engine_load = engine.load_checkpoint
        self._engine_grad_norm = engine.get_global_grad_norm
        self._engine_module_state_dict = engine.module_state_dict
        self._engine_save_16bit_model = engine.save_16bit_model
        self._base_sample: dict[str, torch.Tensor] | None = None  # of the frozen base model (:meth:`_frozen_sample`)

    def attach(self) -> MeftPlugin:
        engine = self.engine
        engine.step = self.step
        engine.backward = self.backward
        if self._engine_scale is not None:
            engine.scale = self.scale
        engine.save_checkpoint = self.save_checkpoint
        engine.load_checkpoint = self.load_checkpoint
        engine.get_global_grad_norm = self.global_grad_norm
        engine.module_state_dict = self.module_state_dict
        engine.save_16bit_model = self.save_16bit_model  # (save_fp16_model calls it too)
        engine.meft = self
        return self

    # ------------------------------------------------------------------ the loss scale
    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """``engine.backward``, measuring the factor the engine applies to ``loss`` (its third positional argument,
        ``scale_wrt_gas``, says whether that factor includes the gradient-accumulation average)."""
        scale_wrt_gas = kwargs.get("scale_wrt_gas", args[1] if len(args) > 1 else True)
        average = 1.0 / self.engine.gradient_accumulation_steps() if scale_wrt_gas else 1.0
        handle = self._measure_loss_grad(loss, average)
        try:
            return self._engine_backward(loss, *args, **kwargs)
        finally:
            if handle is not None:
                handle.remove()

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """``engine.scale``: the caller backpropagates the scaled loss itself; the factor is measured as it does."""
        self._measure_loss_grad(loss, 1.0)
        return self._engine_scale(loss)

    def _measure_loss_grad(self, loss: torch.Tensor, average: float) -> Any:
        if not (isinstance(loss, torch.Tensor) and loss.requires_grad):
            return None

        def record(grad: torch.Tensor) -> None:
            self._loss_grad, self._loss_grad_average = grad.detach(), average

        return loss.register_hook(record)

    def _loss_scale(self) -> float:
        """The loss scale the gradients of this accumulation window carry, as measured at the loss: every backward's
        gradient reaching the loss it was given is (loss scale) x (1 / gradient accumulation steps, unless
        ``scale_wrt_gas=False``). Measuring it covers every path DeepSpeed has for it (the ZeRO optimizers'
        ``loss_scale``, ZeRO stage 0's FP16 optimizers, which DeepSpeed 0.19 does not apply at all in
        ``engine.backward``, a custom loss scaler, ``torch_autocast``'s GradScaler), in fp32 and bf16 it is 1."""
        if self._loss_grad is None:
            return 1.0
        scale = float(self._loss_grad) / self._loss_grad_average
        return float(torch.tensor(scale, dtype=torch.float32))  # the engine's fp32 scale, without 1/gas's rounding

    # ------------------------------------------------------------------ the step
    def sparse_lr(self) -> float:
        """The learning rate of this step for the rows: the engine's current one (before its scheduler moves)."""
        lr = float(self.engine.get_lr()[0])
        return lr if self.lr_scale is None else lr * self.lr_scale

    def step(self, lr_kwargs: dict | None = None) -> Any:
        if not self.engine.is_gradient_accumulation_boundary():
            return self._engine_step(lr_kwargs)
        lr = self.sparse_lr()
        for adapter in self.adapters:
            adapter.collect_row_grads()
        exchange_row_grads(self.adapters, group=self.engine.data_parallel_group)
        scale = self.last_loss_scale = self._loss_scale()
        self._loss_grad = None
        self._unscale_row_grads(scale)
        # fp16: DeepSpeed skips a step whose gradients overflowed and lowers its loss scale; the rows' gradients are
        # part of the step (identical on every rank after the exchange; sharded stores agree on the answer)
        rows_overflowed = self.engine.fp16_enabled() and not self.sparse_optimizer.row_grads_finite()
        max_norm = float(self.engine.gradient_clipping() or 0.0)
        if self._clips_globally():
            self._clip_global_norm(max_norm, scale)
        else:  # the engine clips its own gradients (if at all) by their own norm; the rows' norm is measured anyway
            separate = max_norm > 0 and self.adapters[0].config.clip_rows == "separate"
            self._clip_rows_apart(max_norm if separate else math.inf)
        with overflow_reported(self.engine.optimizer) if rows_overflowed else contextlib.nullcontext():
            result = self._engine_step(lr_kwargs)
        applied = self.engine.was_step_applied()
        if rows_overflowed and not applied:
            self.row_overflow_steps += 1
            logger.warning(
                "meft_ds: fp16 overflow in the row gradients: the step is skipped, as for an overflow of the engine's "
                "own gradients (DeepSpeed's loss scale is now %s).",
                getattr(self.engine.optimizer, "loss_scale", None),
            )
        if rows_overflowed and applied:  # this optimizer has no overflow check to tell: the rows count it themselves
            logger.warning("meft_ds: the engine stepped despite the rows' fp16 overflow; only the row step is skipped.")
        if applied:
            for group in self.sparse_optimizer.param_groups:
                group["lr"] = lr
            self.last_lr = lr
            self.sparse_optimizer.step()  # skips (and counts towards max_nonfinite_steps) non-finite row gradients
        else:
            self.skipped_steps += 1
        self.sparse_optimizer.zero_grad()
        return result

    def _clips_globally(self) -> bool:
        """Whether a boundary clips the engine's and the rows' gradients by one norm (``last_grad_norm`` is then
        that norm)."""
        return float(self.engine.gradient_clipping() or 0.0) > 0 and self.adapters[0].config.clip_rows == "global"

    def global_grad_norm(self) -> float | None:
        """``engine.get_global_grad_norm()``: the last boundary's gradient norm before clipping, over the engine's
        parameters and the rows; the Hugging Face Trainer and Accelerate log it as ``grad_norm``. DeepSpeed's own
        covers the engine's parameters only, and under ``clip_rows="global"`` it reads them after they were clipped
        with the rows (a user would see the routers' norm, at most the clipping threshold). Without clipping, or
        with the rows clipped apart, it combines DeepSpeed's norm with the rows' own (measured at every boundary: one
        read of the row gradients)."""
        if self._clips_globally():
            return self.last_grad_norm
        engine_norm = self._engine_grad_norm()
        if self.last_grad_norm is None:  # no boundary yet
            return engine_norm
        return math.hypot(0.0 if engine_norm is None else float(engine_norm), self.last_grad_norm)

    def _unscale_row_grads(self, scale: float) -> None:
        """The rows' gradients carry the loss scale, as the engine's do until its step unscales them."""
        if scale == 1.0:
            return
        for adapter in self.adapters:
            accumulated = adapter.store.accumulated_grads()
            if accumulated is not None:
                accumulated[1].div_(scale)

    def _dense_params(self) -> list[nn.Parameter]:
        return [p for p in self.engine.module.parameters() if p.requires_grad]

    def _clip_global_norm(self, max_norm: float, scale: float) -> None:
        """Clip the engine's gradients (which carry the loss ``scale``) and the rows' (unscaled) gradients by one
        global norm. Dense gradients are read and written through DeepSpeed's ``safe_get_full_grad`` /
        ``safe_set_full_grad``, which work at every ZeRO stage; after this the engine's own clipping (dense norm <=
        global norm <= max_norm) has nothing left to do."""
        dense = [(p, safe_get_full_grad(p)) for p in self._dense_params()]
        dense = [(p, g) for p, g in dense if g is not None]
        squared = sum((squared_norm(g).item() for _, g in dense), 0.0) / scale**2
        squared += row_grad_squared_norm(self.adapters)
        norm = math.sqrt(squared)
        self.last_grad_norm = norm
        coefficient = clip_coefficient(norm, max_norm)
        if coefficient is None:
            return  # (non-finite: the engine detects the overflow and skips the step)
        for param, grad in dense:
            safe_set_full_grad(param, grad * coefficient)
        scale_row_grads(self.adapters, coefficient)

    def _clip_rows_apart(self, max_norm: float) -> None:
        """Clip the rows' gradients by their own norm (``last_grad_norm``); ``max_norm=inf`` only measures it."""
        norm = math.sqrt(row_grad_squared_norm(self.adapters))
        self.last_grad_norm = norm
        coefficient = clip_coefficient(norm, max_norm)
        if coefficient is None:
            return
        scale_row_grads(self.adapters, coefficient)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(
        self, save_dir: str, tag: Any = None, client_state: dict | None = None, save_latest: bool = True, **kwargs: Any
    ) -> bool:
        """The engine's checkpoint plus the row stores, built in a staging folder and renamed into place; the
        ``latest`` pointer moves last. Assumes ``save_dir`` is on a file system every rank sees (as DeepSpeed's
        own checkpoints do). The frozen base model is left out unless asked for (``exclude_frozen_parameters=False``):
        it never changes, and resuming takes it from the model the run starts with (:meth:`load_checkpoint`; a sample
        of it, 64 values a tensor, is saved to tell another base model from this one). The built-in run's checkpoint
        shrinks from 2.31 to 1.77 GB; a LLaMA-2-7B one by its 13.5 GB of bf16 weights, about a third."""
        kwargs.setdefault("exclude_frozen_parameters", True)
        tag = str(tag) if tag is not None else f"global_step{self.engine.global_steps}"
        root = Path(save_dir)
        staging_root = root / f".staging-{tag}"
        is_writer = dist.get_rank() == 0
        if is_writer:
            shutil.rmtree(staging_root, ignore_errors=True)
            staging_root.mkdir(parents=True)
        dist.barrier()
        saved = self._engine_save(
            str(staging_root), tag=tag, client_state=client_state or {}, save_latest=False, **kwargs
        )
        save_stores(staging_root / tag / STORE_DIR, self.adapters, self.sparse_optimizer, rank=dist.get_rank())
        if kwargs["exclude_frozen_parameters"]:  # else the checkpoint restores the base model itself
            sample = self._frozen_sample()
            if is_writer:
                save_base_sample(staging_root / tag / STORE_DIR, sample)
        dist.barrier()
        if is_writer:
            publish_directory(staging_root / tag, root / tag)
            for extra in staging_root.iterdir():  # what DeepSpeed writes beside the tag (e.g. zero_to_fp32.py)
                extra.replace(root / extra.name)
            staging_root.rmdir()
            if save_latest:
                with atomic_file(root / "latest") as temporary:  # DeepSpeed's own pointer format
                    temporary.write_text(tag)
        dist.barrier()
        return saved

    def module_state_dict(
        self,
        destination: Any = None,
        prefix: str = "",
        keep_vars: bool = False,
        exclude_frozen_parameters: bool = False,
    ) -> Any:
        """The engine's, without any name of a frozen parameter when they are excluded: DeepSpeed drops the names
        ``named_parameters()`` lists, which gives a tied weight under one name only, so a tied embedding stayed in
        every checkpoint under its second name (``lm_head.weight``: 113 MB on the built-in model, 788 MB of bf16 on
        Llama-3.2-3B)."""
        state = self._engine_module_state_dict(destination, prefix, keep_vars, exclude_frozen_parameters)
        if exclude_frozen_parameters:
            for name in _frozen_names(self.engine.module):
                state.pop(prefix + name, None)
        return state

    def save_16bit_model(
        self, save_dir: str, save_filename: str = "pytorch_model.bin", exclude_frozen_parameters: bool = False
    ) -> bool:
        """The engine's, which saves the module's parameters (the frozen base model and the routers; the rows are not
        parameters and were lost), and the trained adapter beside it, in ``save_dir`` (:func:`meft_ds.save_adapter`:
        what ``meft_ds.MeftModel.from_pretrained`` loads). Every rank calls it, as DeepSpeed requires; a sharded
        store's rows are gathered."""
        saved = self._engine_save_16bit_model(save_dir, save_filename, exclude_frozen_parameters)
        save_adapter(self.engine.module, save_dir)
        logger.info("meft_ds: save_16bit_model also wrote the meft adapter (rows and routers) into %s.", save_dir)
        return saved

    def load_checkpoint(
        self, load_dir: str, tag: Any = None, load_module_strict: bool = True, **kwargs: Any
    ) -> tuple[Any, Any]:
        """The engine's checkpoint and the row stores saved with it. A checkpoint without the frozen parameters
        (:meth:`save_checkpoint`'s default) leaves them as the model has them; ``load_module_strict`` then holds for
        the trainable ones: each must be in the checkpoint, and nothing else may be. The frozen parameters must be
        those the run was saved with (compared by a sample, :func:`meft_ds.checkpoint.check_base_sample`), and the
        adapters' shapes those of the checkpoint (:func:`meft_ds.checkpoint.check_stores`), and ZeRO's state saved by
        as many ranks as this run has, unless ``"checkpoint": {"load_universal": true}`` loads a universal one
        (:func:`meft_ds.checkpoint.tag_to_load` picks which; ``python -m meft_ds.universal`` makes it): a
        :class:`CheckpointError` before anything is loaded otherwise. The row stores load at any number of ranks."""
        universal = self.engine.load_universal_checkpoint()
        tag = tag_to_load(Path(load_dir), tag, universal=universal)
        if tag is not None and dist.get_rank() == 0:
            recover_directory(Path(load_dir) / str(tag))
        dist.barrier()
        stores = Path(load_dir) / str(tag) / STORE_DIR
        if tag is not None and stores.parent.is_dir():  # else DeepSpeed finds no checkpoint and loads nothing
            check_has_stores(stores.parent)
            check_world_size(stores.parent, self.engine.dp_world_size, universal=universal)
            if has_base_sample(stores):
                check_base_sample(stores, self._frozen_sample())
            check_stores(stores, self.adapters)
        if "custom_load_fn" not in kwargs:
            kwargs["custom_load_fn"] = functools.partial(_load_module, strict=load_module_strict)
        load_path, client_state = self._engine_load(load_dir, tag=tag, load_module_strict=load_module_strict, **kwargs)
        if load_path is None:
            return load_path, client_state
        load_stores(stores, self.adapters, self.sparse_optimizer)
        return load_path, client_state

    def _frozen_sample(self) -> dict[str, torch.Tensor]:
        """:func:`meft_ds.checkpoint.base_sample` of the model, taken once (the base model is frozen; every rank takes
        part under ZeRO-3)."""
        if self._base_sample is None:
            self._base_sample = base_sample(self.engine.module)
        return self._base_sample


def _load_module(src: dict[str, torch.Tensor], dst: nn.Module, *, strict: bool) -> None:
    """Load a checkpoint's module state into ``dst``, where frozen parameters may be missing (a checkpoint saved
    without them); ``strict``: every other key must match, as ``load_state_dict(strict=True)`` would demand."""
    result = dst.load_state_dict(src, strict=False)
    frozen = _frozen_names(dst)
    missing = [key for key in result.missing_keys if key not in frozen]
    if strict and (missing or result.unexpected_keys):
        raise CheckpointError(
            f"the checkpoint's module state does not match the model: missing {missing}, unexpected "
            f"{result.unexpected_keys}. Fix: resume with the model and meft settings the run was saved with."
        )


def _frozen_names(module: nn.Module) -> set[str]:
    """Every name of a frozen parameter, a tied one's each name."""
    return {name for name, param in module.named_parameters(remove_duplicate=False) if not param.requires_grad}
