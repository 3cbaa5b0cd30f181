"""`SparseRowAdam`: AdamW on the rows that received gradients, and only on those (lazy/sparse Adam).

Untouched rows and their moments are not read or written: they stay bit-for-bit unchanged, and their moments do
not decay. Bias correction uses the optimizer's global step count, as SPEC.md prescribes (``bias_correction="global"``),
or each row's own count of updates (``"per_row"``: a row first touched at step t then gets the update a fresh Adam
makes at its step 1, instead of one about 3.2x the learning rate). Three backends, one math:

* ``"fused"``: meft_ds's row-indexed AdamW kernel updates the touched rows in place (no copies), at the memory
  bandwidth DeepSpeed's dense CPU Adam reaches (see ``launch/bench.py``).
* ``"deepspeed"``: touched rows are gathered into contiguous buffers, updated by DeepSpeed's CPU Adam kernel
  (``CPUAdamBuilder``; it calls ``.contiguous()`` internally, so it must never get a strided view) and scattered back
  (global bias correction only: the kernel takes one step count).
* ``"torch"``: the same gather/scatter around plain torch operations (the reference; no compiler needed).

``"auto"`` takes the first that builds, in that order, warning once when it has to fall back.

Whether the gradients are finite (a step with a NaN or inf is skipped, touching nothing) is known from their
accumulation (:mod:`meft_ds.accumulator`): the step does not read them a second time to check.

The optimizer sits below the adapters and their stores: it knows them only as :class:`AdapterRows` and
:class:`StoreRows`, the part of :class:`meft_ds.store.RowStore` it uses (every store tier has it).
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch

from meft_ds.ops import cpu_kernels, kernel_threads

BACKENDS = ("auto", "fused", "deepspeed", "torch")
BIAS_CORRECTIONS = ("global", "per_row")
logger = logging.getLogger("meft_ds")


class StoreRows(Protocol):
    """What the optimizer needs of a row store (see :class:`meft_ds.store.RowStore`, which documents each)."""

    row_steps: torch.Tensor | None

    def accumulated_grads(self) -> tuple[torch.Tensor, torch.Tensor] | None: ...
    def grads_finite(self) -> bool: ...
    def sum_over_shards(self, value: torch.Tensor) -> torch.Tensor: ...
    def start_update(self, row_ids: torch.Tensor) -> None: ...
    def rows_for_update(
        self, row_ids: torch.Tensor
    ) -> AbstractContextManager[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]: ...
    def drop_grads(self) -> None: ...
    def training_state(self) -> dict[str, torch.Tensor]: ...
    def check_training_state(self, state: dict[str, torch.Tensor]) -> None: ...
    def load_training_state(self, state: dict[str, torch.Tensor]) -> None: ...


class AdapterRows(Protocol):
    """What the optimizer needs of an adapter (:class:`meft_ds.adapter.SparseKeyExpertAdapter` is one)."""

    @property
    def store(self) -> StoreRows: ...
    def collect_row_grads(self) -> None: ...
    def drop_row_grads(self) -> None: ...
    def rows_updated(self, row_ids: torch.Tensor) -> None: ...
    def rows_to_update(self, row_ids: torch.Tensor) -> torch.Tensor | None: ...
    def rows_changed(self) -> None: ...


class NonFiniteGradientError(RuntimeError):
    """Several consecutive optimizer steps had NaN or inf row gradients."""


_KERNEL_IDS = itertools.count(1 << 20)  # far from DeepSpeedCPUAdam's own ids, which count up from 0
_STEPPED: weakref.WeakSet = weakref.WeakSet()  # every adapter a SparseRowAdam was made for


def has_row_optimizer(adapter: AdapterRows) -> bool:
    """Whether a :class:`SparseRowAdam` was made for ``adapter``: without one, nothing steps its rows."""
    return adapter in _STEPPED


@functools.cache
def _deepspeed_adam() -> Any | None:
    try:
        from deepspeed.ops.op_builder import CPUAdamBuilder

        return CPUAdamBuilder().load()
    except Exception as error:  # the JIT build needs a compiler and ninja
        warnings.warn(
            f"meft_ds: DeepSpeed's CPU Adam kernel could not be built ({type(error).__name__}: {error}).", stacklevel=3
        )
        return None


def resolve_backend(backend: str) -> str:
    """The backend to use: ``backend`` itself if it is available, or the first available one for ``"auto"``."""
    if backend not in BACKENDS:
        raise ValueError(f"SparseRowAdam: unknown backend {backend!r}. Fix: use one of {', '.join(BACKENDS)}.")
    available = {"fused": lambda: cpu_kernels() is not None, "deepspeed": lambda: _deepspeed_adam() is not None}
    if backend == "auto":
        chosen = next((name for name in ("fused", "deepspeed") if available[name]()), "torch")
        if chosen != "fused":
            warnings.warn(f"meft_ds: the sparse Adam uses its slower {chosen!r} backend.", stacklevel=3)
        return chosen
    if backend in available and not available[backend]():
        raise RuntimeError(f"SparseRowAdam: backend {backend!r} could not be built. Fix: use backend='auto'.")
    return backend


def adamw_torch_(
    params: torch.Tensor,
    grads: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int | torch.Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """In-place AdamW, the same operations as ``torch.optim.AdamW``'s single-tensor path. ``step`` is the step count
    of every row, or a tensor of one count per row (the leading dimension), for per-row bias correction."""
    params.mul_(1.0 - lr * weight_decay)
    exp_avg.lerp_(grads, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grads, grads, value=1.0 - beta2)
    if isinstance(step, torch.Tensor):  # per row, in float64 as the scalar path computes its constants
        per_row = (-1,) + (1,) * (params.dim() - 1)
        step = step.double().view(per_row)
        bias_correction2_sqrt = (1.0 - beta2**step).sqrt().float()
        step_size = (lr / (1.0 - beta1**step)).float()
        params.sub_(exp_avg / (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps) * step_size)
        return
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
        adapters: Iterable[AdapterRows],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        backend: str = "auto",
        max_nonfinite_steps: int = 3,
        bias_correction: str = "global",
    ) -> None:
        self.adapters = list(adapters)
        if not self.adapters:
            raise ValueError("SparseRowAdam: got no adapters. Fix: pass meft_ds.adapters(model) after meft_ds.inject.")
        if lr < 0 or eps <= 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(
                f"SparseRowAdam: invalid hyperparameters lr={lr}, betas={betas}, eps={eps}, "
                f"weight_decay={weight_decay}. Fix: lr >= 0, 0 <= betas < 1, eps > 0, weight_decay >= 0."
            )
        if bias_correction not in BIAS_CORRECTIONS:
            raise ValueError(
                f"SparseRowAdam: unknown bias_correction {bias_correction!r}. Fix: use one of "
                f"{', '.join(map(repr, BIAS_CORRECTIONS))}."
            )
        self.per_row = bias_correction == "per_row"
        if self.per_row and any(a.store.row_steps is None for a in self.adapters):
            raise ValueError(
                "SparseRowAdam: bias_correction='per_row' needs per-row step counts, which the NVMe store does not "
                "keep yet. Fix: use bias_correction='global' with it."
            )
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        # torch.optim.Optimizer wants parameters to hang its param groups on (schedulers read and write the
        # groups); the rows themselves live in the stores, so each adapter is represented by a placeholder
        super().__init__([torch.empty(0) for _ in self.adapters], defaults)
        self.global_step = 0
        self.max_nonfinite_steps = max_nonfinite_steps
        self.nonfinite_steps = 0  # steps skipped because a row gradient was NaN or inf, in total
        self._nonfinite_streak = 0
        self.backend = resolve_backend(backend)
        if self.per_row and self.backend == "deepspeed":
            raise ValueError(
                "SparseRowAdam: DeepSpeed's Adam kernel takes one step count, not one per row. Fix: use "
                "backend='fused' or 'torch' with bias_correction='per_row'."
            )
        self._deepspeed_id = None
        if self.backend == "deepspeed":
            self._deepspeed_id = next(_KERNEL_IDS)
            _deepspeed_adam().create_adam(self._deepspeed_id, lr, betas[0], betas[1], eps, weight_decay, True, False)
        _STEPPED.update(self.adapters)

    def __del__(self) -> None:
        if getattr(self, "_deepspeed_id", None) is not None:
            _deepspeed_adam().destroy_adam(self._deepspeed_id)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for adapter in self.adapters:
            adapter.collect_row_grads()
        self._check_averaged_over_ranks()
        if not self.row_grads_finite():
            self._skip_nonfinite_step()
            return loss
        self._nonfinite_streak = 0
        self.global_step += 1
        group = self.param_groups[0]
        accumulated = [self._to_update(adapter) for adapter in self.adapters]
        for position, (adapter, grads) in enumerate(zip(self.adapters, accumulated, strict=True)):
            following = position + 1
            if following < len(self.adapters) and (upcoming := accumulated[following]) is not None:
                self.adapters[following].store.start_update(upcoming[0])  # fetched (NVMe: read) while this updates
            if grads is None:
                updated = torch.empty(0, dtype=torch.int64)
            else:
                updated = grads[0]
                self._update_rows(adapter.store, *grads, group)
            adapter.rows_updated(updated)  # every rank, every adapter (a sharded store's collectives pair up)
            adapter.store.drop_grads()
        return loss

    def _check_averaged_over_ranks(self) -> None:
        """With several ranks, each rank's row gradients must have been averaged over them (as the engine's plugin
        does): stepping with its own alone, each replica would drift from the others, and a sharded store's owners
        would miss the other ranks' gradients, silently."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        world = torch.distributed.get_world_size()
        if world > 1 and not all(a.store.grad_accumulator.averaged_over_ranks for a in self.adapters):
            raise RuntimeError(
                f"SparseRowAdam.step() in a run of {world} ranks, but the rows' gradients were not averaged over the "
                "ranks: each rank would update its rows with its own gradients alone. Fix: train through "
                "meft_ds.initialize or meft_ds.attach (the engine's step averages them), or call "
                "meft_ds.exchange_row_grads(meft_ds.adapters(model)) on every rank before step()."
            )

    def row_grads_finite(self) -> bool:
        """Whether every row gradient of every adapter is finite, checked before any row is updated (a skipped step
        must leave all rows untouched). Sharded stores hold different rows on each rank, so the ranks agree on the
        answer (all of them skip, or none)."""
        finite = all(adapter.store.grads_finite() for adapter in self.adapters)
        nonfinite_ranks = torch.tensor(0.0 if finite else 1.0, dtype=torch.float64)
        return self.adapters[0].store.sum_over_shards(nonfinite_ranks).item() == 0

    @staticmethod
    def _to_update(adapter: AdapterRows) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The ``(ids, grads)`` of the rows of ``adapter`` that this step updates: those holding a gradient, or the
        part of them the adapter chooses (``meft.update_rows``)."""
        accumulated = adapter.store.accumulated_grads()
        # asked even with no gradient here: a shard may own none of the step's rows, and the next step counts afresh
        chosen = adapter.rows_to_update(torch.empty(0, dtype=torch.int64) if accumulated is None else accumulated[0])
        if accumulated is None or chosen is None:
            return accumulated
        return (accumulated[0][chosen], accumulated[1][chosen]) if chosen.numel() else None

    def _accumulated(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The accumulated ``(ids, grads)`` of every adapter whose store holds row gradients."""
        for adapter in self.adapters:
            accumulated = adapter.store.accumulated_grads()
            if accumulated is not None:
                yield accumulated

    def _skip_nonfinite_step(self) -> None:
        """A NaN/inf row gradient: leave every row and moment untouched, drop the gradients, count the step; too
        many in a row means the run diverged, and going on would only burn time."""
        self.zero_grad()
        self.nonfinite_steps += 1
        self._nonfinite_streak += 1
        logger.warning(
            "meft_ds: NaN or inf in the row gradients; the row step is skipped (%d in a row, %d in total).",
            self._nonfinite_streak, self.nonfinite_steps,
        )  # fmt: skip
        if self._nonfinite_streak >= self.max_nonfinite_steps:
            raise NonFiniteGradientError(
                f"meft_ds: {self._nonfinite_streak} optimizer steps in a row had NaN or inf row gradients, so the run "
                "has diverged. Fix: resume from the last checkpoint with a lower learning rate or tighter "
                "gradient_clipping (the store was left untouched by the skipped steps)."
            )

    def _update_rows(self, store: StoreRows, row_ids: torch.Tensor, grads: torch.Tensor, group: dict[str, Any]) -> None:
        step, lr, (beta1, beta2) = self.global_step, group["lr"], group["betas"]
        eps, weight_decay = group["eps"], group["weight_decay"]
        grads = grads.contiguous()
        with store.rows_for_update(row_ids) as (*state, index):
            row_steps = store.row_steps if self.per_row else torch.empty(0, dtype=torch.int32)
            if self.backend == "fused":
                cpu_kernels().row_adamw_(
                    *state, index, grads, step, lr, beta1, beta2, eps, weight_decay, kernel_threads(), row_steps
                )
            else:  # gather the touched rows into contiguous buffers, update them, scatter them back
                params, exp_avg, exp_avg_sq = gathered = [t.index_select(0, index) for t in state]
                if self.backend == "deepspeed":
                    _deepspeed_adam().adam_update(
                        self._deepspeed_id,
                        step,
                        lr,
                        beta1,
                        beta2,
                        eps,
                        weight_decay,
                        True,
                        params,
                        grads,
                        exp_avg,
                        exp_avg_sq,
                    )
                else:
                    if self.per_row:
                        row_steps[index] += 1
                    adamw_torch_(
                        params,
                        grads,
                        exp_avg,
                        exp_avg_sq,
                        step=row_steps[index] if self.per_row else step,
                        lr=lr,
                        beta1=beta1,
                        beta2=beta2,
                        eps=eps,
                        weight_decay=weight_decay,
                    )
                for target, buffer in zip(state, gathered, strict=True):
                    target.index_copy_(0, index, buffer)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the rows' accumulated gradients (the stores and device caches hold them, not ``.grad``)."""
        for adapter in self.adapters:
            adapter.drop_row_grads()

    def state_dict(self, *, with_rows: bool | None = None) -> dict[str, Any]:
        """Hyperparameters, the global step and, ``with_rows``, each adapter's rows with their moments and per-row
        step counts (``"rows"``: the stores' own tensors, not copies). The rows are not parameters, so a model's
        ``state_dict`` never holds them: this is what resuming a plain loop needs (``torch.save(opt.state_dict())``,
        Accelerate's ``save_state`` of a prepared optimizer; before, both lost the rows silently). A store whose rows
        are not all in this process's memory (NVMe, sharded) refuses, naming the fix.

        ``with_rows`` defaults to whether this optimizer has stepped: before, the rows are the model's own, and
        Accelerate's ``prepare`` reads a fresh optimizer's state to move it to the device (the whole store would
        travel there and back). DeepSpeed's checkpoints save the stores in files of their own, ``with_rows=False``."""
        state = super().state_dict()
        state["global_step"] = self.global_step
        if with_rows if with_rows is not None else self.global_step > 0:
            state["rows"] = [adapter.store.training_state() for adapter in self.adapters]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; with ``"rows"``, into the stores (checked against every layer first)."""
        state_dict = dict(state_dict)
        rows = state_dict.pop("rows", None)
        if rows is not None:
            if len(rows) != len(self.adapters):
                raise ValueError(
                    f"SparseRowAdam.load_state_dict: the state holds the rows of {len(rows)} layers, this optimizer "
                    f"steps {len(self.adapters)}. Fix: load it into the model and meft settings it was saved from."
                )
            for adapter, saved in zip(self.adapters, rows, strict=True):
                adapter.store.check_training_state(saved)
        self.global_step = int(state_dict.pop("global_step"))
        super().load_state_dict(state_dict)
        for adapter, saved in zip(self.adapters, rows or [], strict=False):
            adapter.store.load_training_state(saved)
            adapter.drop_row_grads()
            adapter.rows_changed()
