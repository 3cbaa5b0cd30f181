"""Gradient clipping for a plain PyTorch loop: one norm over the routers' gradients and the rows' (the engine's
``clip_rows="global"``, which :mod:`meft_ds.plugin` applies under DeepSpeed)."""

from __future__ import annotations

import math

import torch
from torch import nn

from meft_ds.distributed import clip_coefficient, row_grad_squared_norm, scale_row_grads, squared_norm
from meft_ds.inject import adapters


def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a model with adapters. torch's sees parameters only: it clips the
    routers and leaves the rows' gradients, which live in the row stores, unclipped and out of its norm. This takes
    one norm over the trainable parameters' gradients and the rows', and scales both by ``max_norm / norm`` where the
    norm exceeds ``max_norm``. Call it after the backward (with several ranks, after DDP's all-reduce and
    :func:`meft_ds.exchange_row_grads`, so that every rank clips the same averaged gradients), before the optimizers
    step. Returns the norm before clipping, as torch's does (non-finite: nothing is scaled)."""
    model_adapters = adapters(model)
    for adapter in model_adapters:
        adapter.collect_row_grads()  # the last backward's row gradients may still be on their way to the stores
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    squared = sum((squared_norm(g).item() for g in grads), 0.0) + row_grad_squared_norm(model_adapters)
    norm = math.sqrt(squared)
    coefficient = clip_coefficient(norm, max_norm)
    if coefficient is not None:
        for grad in grads:
            grad.mul_(coefficient)
        scale_row_grads(model_adapters, coefficient)
    return torch.tensor(norm)
