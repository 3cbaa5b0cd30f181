"""Shared by the Hugging Face Trainer and Accelerate tests: the shipped config, training data, a clean Accelerate."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate.state import AcceleratorState

import meft_ds
from meft_ds.data import collate, facts_dataset, tokenize_for_training

ROOT = Path(__file__).resolve().parents[1]
MEFT = {"num_neurons": 64, "top_k": 4, "seed": 3, "row_dtype": "auto"}
USE_DEEPSPEED = "ACCELERATE_USE_DEEPSPEED"


def meft_json(meft: dict[str, Any] | None = MEFT) -> dict[str, Any]:
    """The shipped ds_configs/meft.json (DeepSpeed's values "auto") with tiny meft settings, without TensorBoard."""
    config = json.loads((ROOT / "ds_configs" / "meft.json").read_text())
    del config["tensorboard"]
    if meft is None:
        del config["meft"]
    else:
        config["meft"] = dict(meft)
    return config


def features(tokenizer: Any, count: int = 48) -> list[dict[str, list[int]]]:
    return tokenize_for_training(facts_dataset()[:count], tokenizer, max_length=48)


def collator(tokenizer: Any) -> Any:
    return partial(collate, pad_token_id=tokenizer.eos_token_id)


def batch_loss(model: torch.nn.Module, tokenizer: Any) -> float:
    """The loss on a fixed batch, to see training lower it."""
    with torch.no_grad():
        return model(**collator(tokenizer)(features(tokenizer, 4))).loss.item()


def store_rows(model: torch.nn.Module) -> list[torch.Tensor]:
    return [adapter.store.rows.clone() for adapter in meft_ds.adapters(model)]


@contextlib.contextmanager
def fresh_accelerate() -> Iterator[None]:
    """Accelerate keeps process-wide state: the AcceleratorState singleton (a later Accelerator cannot change its
    DeepSpeed plugin) and ACCELERATE_USE_DEEPSPEED=true in os.environ (DeepSpeed on for every later Trainer). Start
    clean and leave clean, so that tests do not leak into each other."""
    saved = os.environ.get(USE_DEEPSPEED)
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        yield
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        if saved is None:
            os.environ.pop(USE_DEEPSPEED, None)
        else:
            os.environ[USE_DEEPSPEED] = saved
