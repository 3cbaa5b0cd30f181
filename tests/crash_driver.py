"""Trains a tiny model for 2 steps, checkpoints, trains a 3rd step, then SIGKILLs itself at a chosen point of the
second checkpoint save. Used by test_crash_safety.py; run as: crash_driver.py DIRECTORY POINT REFERENCE_FILE."""

from __future__ import annotations

import os
import signal
import sys

import torch
from tiny_models import tiny_model, token_batch

import meft_ds
import meft_ds.files
import meft_ds.plugin
import meft_ds.store

CONFIG = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
    "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
    "meft": {"num_neurons": 64, "top_k": 4},
}


def die(*_args, **_kwargs) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_on_call(owner: object, name: str, *, call: int = 1, when=lambda *a, **k: True) -> None:
    """Replace ``owner.name`` so that its ``call``-th matching call runs it and then kills the process (call=0:
    kill before running it)."""
    original, seen = getattr(owner, name), [0]

    def wrapper(*args, **kwargs):
        if not when(*args, **kwargs):
            return original(*args, **kwargs)
        seen[0] += 1
        if call == 0:
            die()
        result = original(*args, **kwargs)
        if seen[0] == call:
            die()
        return result

    setattr(owner, name, wrapper)


def main(directory: str, point: str, reference: str) -> None:
    model = tiny_model()
    engine, *_ = meft_ds.initialize(model=model, config=CONFIG)

    def step(seed: int) -> None:
        batch = token_batch(seed=seed)
        engine.backward(engine(batch, labels=batch).loss)
        engine.step()

    step(0)
    step(1)
    engine.save_checkpoint(directory)  # global_step2: the checkpoint that must survive
    torch.save({a.layer_index: a.store.rows.clone() for a in meft_ds.adapters(model)}, reference)
    step(2)
    tag = None
    if point == "engine_files":  # in the middle of DeepSpeed's own files
        kill_on_call(engine.checkpoint_engine, "save", call=1)
    elif point == "store_files":  # after the first layer's store file
        kill_on_call(meft_ds.store, "save_file", call=1)
    elif point == "publish":  # everything written, nothing renamed yet
        kill_on_call(meft_ds.plugin, "publish_directory", call=0)
    elif point == "between_renames":  # re-saving a tag: the old version moved aside, the new one not yet in place
        tag = "global_step2"
        kill_on_call(meft_ds.files.os, "replace", call=1, when=lambda src, dst: str(dst).endswith(".old"))
    elif point == "latest":  # the new tag published, the pointer not yet moved
        kill_on_call(meft_ds.files.os, "replace", call=0, when=lambda src, dst: str(dst).endswith("latest"))
    else:
        raise SystemExit(f"unknown point {point}")
    engine.save_checkpoint(directory, tag=tag)
    print("the save completed without being killed")
    sys.exit(1)


if __name__ == "__main__":
    main(*sys.argv[1:4])
