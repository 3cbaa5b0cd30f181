"""`SparseRowAdam`: AdamW on the rows that received gradients, and only on those (lazy/sparse Adam).

Touched rows are gathered into contiguous buffers, updated by DeepSpeed's CPU Adam kernel (``CPUAdamBuilder``;
the kernel calls ``.contiguous()`` internally, so it must never be handed a strided view) and scattered back.
Untouched rows and their moments are not read or written: they stay bit-for-bit unchanged, and their moments do
not decay. Bias correction uses the optimizer's global step count, as SPEC.md prescribes.
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

from meft_ds.adapter import SparseKeyExpertAdapter

BACKENDS = ("auto", "deepspeed", "torch")
_KERNEL_IDS = itertools.count(1 << 20)  # far from DeepSpeedCPUAdam's own ids, which count up from 0


@functools.cache
def _load_deepspeed_kernel() -> Any:
    from deepspeed.ops.op_builder import CPUAdamBuilder

    return CPUAdamBuilder().load()


def load_cpu_adam_kernel(backend: str) -> Any | None:
    """DeepSpeed's CPU Adam op, or ``None`` for the pure-torch path (``"auto"`` warns once if the build fails)."""
    if backend not in BACKENDS:
        raise ValueError(f"SparseRowAdam: unknown backend {backend!r}. Fix: use one of {', '.join(BACKENDS)}.")
    if backend == "torch":
        return None
    try:
        return _load_deepspeed_kernel()
    except Exception as error:  # the JIT build needs a compiler and ninja; any failure falls back
        if backend == "deepspeed":
            raise
        warnings.warn(
            f"meft_ds: DeepSpeed's CPU Adam kernel could not be built ({type(error).__name__}: {error}); the sparse "
            "optimizer uses its pure-torch path, which is slower. Install ninja and a C++ compiler to fix.",
            stacklevel=3,
        )
        _load_deepspeed_kernel.cache_clear()
        return None


def adamw_torch_(
    params: torch.Tensor,
    grads: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """In-place AdamW, the same operations as ``torch.optim.AdamW``'s single-tensor path."""
    params.mul_(1.0 - lr * weight_decay)
    exp_avg.lerp_(grads, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grads, grads, value=1.0 - beta2)
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    params.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


class SparseRowAdam(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) over the row stores of ``adapters``, touched rows only.

    It is a ``torch.optim.Optimizer``, so learning-rate schedulers drive it like any other; ``step()`` updates the
    rows whose gradients the stores accumulated since the last step and clears them, ``zero_grad()`` drops them.
    Works in a plain PyTorch loop (``loss.backward(); opt.step(); opt.zero_grad()``) and under
    :func:`meft_ds.initialize`, which calls it at each DeepSpeed optimizer boundary.
    """

    def __init__(
        self,
        adapters: Iterable[SparseKeyExpertAdapter],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        backend: str = "auto",
    ) -> None:
        self.adapters = list(adapters)
        if not self.adapters:
            raise ValueError("SparseRowAdam: got no adapters. Fix: pass meft_ds.adapters(model) after meft_ds.inject.")
        if lr < 0 or eps <= 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(
                f"SparseRowAdam: invalid hyperparameters lr={lr}, betas={betas}, eps={eps}, "
                f"weight_decay={weight_decay}. Fix: lr >= 0, 0 <= betas < 1, eps > 0, weight_decay >= 0."
            )
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__([a.store.rows for a in self.adapters], defaults)
        self.global_step = 0
        self._kernel = load_cpu_adam_kernel(backend)
        self._kernel_id = next(_KERNEL_IDS)
        if self._kernel is not None:
            self._kernel.create_adam(self._kernel_id, lr, betas[0], betas[1], eps, weight_decay, True, False)

    @property
    def backend(self) -> str:
        return "torch" if self._kernel is None else "deepspeed"

    def __del__(self) -> None:
        kernel = getattr(self, "_kernel", None)
        if kernel is not None:
            kernel.destroy_adam(self._kernel_id)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.global_step += 1
        group = self.param_groups[0]
        for adapter in self.adapters:
            accumulated = adapter.store.accumulated_grads()
            if accumulated is None:
                continue
            self._update_rows(adapter, *accumulated, group)
            adapter.store.drop_grads()
        return loss

    def _update_rows(
        self, adapter: SparseKeyExpertAdapter, ids: torch.Tensor, grads: torch.Tensor, group: dict[str, Any]
    ) -> None:
        store = adapter.store
        params = store.rows.index_select(0, ids)
        exp_avg = store.exp_avg.index_select(0, ids)
        exp_avg_sq = store.exp_avg_sq.index_select(0, ids)
        beta1, beta2 = group["betas"]
        if self._kernel is None:
            adamw_torch_(
                params,
                grads,
                exp_avg,
                exp_avg_sq,
                step=self.global_step,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
            )
        else:
            self._kernel.adam_update(
                self._kernel_id,
                self.global_step,
                group["lr"],
                beta1,
                beta2,
                group["eps"],
                group["weight_decay"],
                True,
                params,
                grads.contiguous(),
                exp_avg,
                exp_avg_sq,
            )
        store.rows.index_copy_(0, ids, params)
        store.exp_avg.index_copy_(0, ids, exp_avg)
        store.exp_avg_sq.index_copy_(0, ids, exp_avg_sq)
        adapter.traffic.rows_updated += ids.numel()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the rows' accumulated gradients (the stores hold them, not ``.grad``)."""
        for adapter in self.adapters:
            adapter.store.drop_grads()

    def state_dict(self) -> dict[str, Any]:
        """Hyperparameters and the global step; rows and moments are saved with the stores."""
        state = super().state_dict()
        state["global_step"] = self.global_step
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self.global_step = int(state_dict.pop("global_step"))
        super().load_state_dict(state_dict)
