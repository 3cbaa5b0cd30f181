"""What the in-process engine tests share: a tiny MEFT config, a DeepSpeed config per ZeRO stage, and training a
tiny model through ``meft_ds.initialize`` with what each step logged."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from tiny_models import SMALL_BUCKET, tiny_model, token_batch

import meft_ds

MEFT = {"num_neurons": 64, "top_k": 4, "seed": 3}
LR = 1e-2


def ds_config(stage: int, *, clip: float = 0.0, offload: bool = True, gas: int = 1, precision: str = "fp32") -> dict:
    zero = {"stage": stage, "reduce_bucket_size": SMALL_BUCKET}
    if stage and offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": clip,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}},
        "scheduler": {
            "type": "WarmupLR",
            "params": {"warmup_min_lr": 0.0, "warmup_max_lr": LR, "warmup_num_steps": 4, "warmup_type": "linear"},
        },
        "zero_optimization": zero,
        "meft": MEFT,
    }
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    return config


def batches(n: int) -> list[torch.Tensor]:
    return [token_batch(batch=2, length=12, seed=10 + i) for i in range(n)]


class Run(NamedTuple):
    model: torch.nn.Module
    engine: Any
    losses: list[float]
    lrs: list[float]
    grad_norms: list[float | None]  # engine.get_global_grad_norm() of each step (engine + rows, when clipping)
    row_grad_dtypes: set[torch.dtype]  # of the rows' accumulated gradients at the first boundary


def train_with_engine(config: dict, steps: int, model_parameters: Any = None, model: Any = None) -> Run:
    model = model or tiny_model()
    engine, *_ = meft_ds.initialize(model=model, config=config, model_parameters=model_parameters)
    losses, lrs, norms, grad_dtypes = [], [], [], set()
    for i, batch in enumerate(batches(steps * config["gradient_accumulation_steps"])):
        loss = engine(batch, labels=batch).loss
        engine.backward(loss)
        if i == 0:
            for adapter in meft_ds.adapters(model):
                adapter.collect_row_grads()
                grad_dtypes.add(adapter.store.accumulated_grads()[1].dtype)
        engine.step()
        losses.append(loss.item())
        lrs.append(engine.meft.last_lr)
        norms.append(engine.get_global_grad_norm())  # what the HF Trainer and Accelerate log
    return Run(model, engine, losses, lrs, norms, grad_dtypes)


def assert_same_training(model_a: torch.nn.Module, model_b: torch.nn.Module, atol: float = 2e-5) -> None:
    for a, b in zip(meft_ds.adapters(model_a), meft_ds.adapters(model_b), strict=True):
        torch.testing.assert_close(a.store.rows, b.store.rows, rtol=0, atol=atol)
        torch.testing.assert_close(a.router.weight, b.router.weight, rtol=0, atol=atol)
