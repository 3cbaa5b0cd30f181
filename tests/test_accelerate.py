"""Accelerate's DeepSpeed integration in-process (one rank, ds_configs/meft.json): ``meft_ds.attach`` on the engine
that ``accelerator.prepare`` returns. The rows learn at every optimizer step (gradient accumulation through
``accelerator.accumulate``) with the engine's schedule, and ``save_state`` / ``load_state`` carry the store."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin
from hf_support import MEFT, batch_loss, collator, features, fresh_accelerate, meft_json, store_rows
from tiny_models import tiny_model, token_batch, word_tokenizer
from torch.utils.data import DataLoader

import meft_ds
from meft_ds.ds_config import resolve_auto

STEPS, SAVE_AT, LR, ACCUMULATE = 6, 3, 1e-2, 2


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return word_tokenizer(chat=True)


@dataclass
class Run:
    model: torch.nn.Module
    losses: list[float] = field(default_factory=list)  # per micro-batch
    dense_lr: list[float] = field(default_factory=list)  # per optimizer step
    row_lr: list[float] = field(default_factory=list)
    rows_at: dict[int, list[torch.Tensor]] = field(default_factory=dict)


def train(tokenizer: Any, checkpoint: Path, *, resume: bool = False) -> Run:
    """What launch/examples/accelerate_loop.py does, with gradient accumulation and records."""
    with fresh_accelerate():
        accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=meft_json()))
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        run = Run(meft_ds.inject(tiny_model(), ds_config.pop("meft")))
        resolve_auto(ds_config, max_steps=STEPS, lr=LR, micro_batch_size=2, gradient_accumulation_steps=ACCUMULATE)
        loader = DataLoader(features(tokenizer), batch_size=2, collate_fn=collator(tokenizer))
        engine, loader = accelerator.prepare(run.model, loader)
        plugin = meft_ds.attach(engine)
        if resume:
            accelerator.load_state(str(checkpoint))
        run.rows_at[engine.global_steps] = store_rows(run.model)
        for batch in itertools.islice(loader, engine.global_steps * ACCUMULATE, STEPS * ACCUMULATE):
            with accelerator.accumulate(engine):
                lr = engine.get_lr()[0]
                loss = engine(**batch).loss
                accelerator.backward(loss)
            run.losses.append(loss.item())
            if accelerator.sync_gradients:
                run.dense_lr.append(lr)
                run.row_lr.append(plugin.last_lr)
                if engine.global_steps == SAVE_AT and not resume:
                    accelerator.save_state(str(checkpoint))
                    run.rows_at[SAVE_AT] = store_rows(run.model)
        assert plugin.sparse_optimizer.state_dict()["global_step"] == STEPS == engine.global_steps
        return run


def test_attach_trains_with_the_schedule_and_save_load_state_resume_the_run(tmp_path: Path, tokenizer: Any) -> None:
    before = batch_loss(tiny_model(), tokenizer)
    straight = train(tokenizer, tmp_path / "checkpoint")
    assert straight.row_lr == straight.dense_lr
    assert straight.row_lr[0] == 0.0 and max(straight.row_lr) == pytest.approx(LR) and straight.row_lr[-1] < LR
    assert all(not torch.equal(a, b) for a, b in zip(store_rows(straight.model), straight.rows_at[0], strict=True))
    assert batch_loss(straight.model, tokenizer) < before
    assert meft_ds.adapters(straight.model)[0].config.num_neurons == MEFT["num_neurons"]

    resumed = train(tokenizer, tmp_path / "checkpoint", resume=True)
    for after_load, at_save in zip(resumed.rows_at[SAVE_AT], straight.rows_at[SAVE_AT], strict=True):
        assert torch.equal(after_load, at_save)
    assert resumed.row_lr == straight.row_lr[SAVE_AT:]
    assert resumed.losses == pytest.approx(straight.losses[SAVE_AT * ACCUMULATE :], rel=1e-5)
    for a, b in zip(store_rows(resumed.model), store_rows(straight.model), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_without_deepspeed_save_state_and_load_state_resume_the_rows(tmp_path: Path) -> None:
    """Accelerate without DeepSpeed saves a prepared optimizer's state_dict: the sparse Adam's held no rows, so
    load_state resumed the routers with untrained rows, silently."""

    def prepared() -> tuple[Accelerator, Any, list[Any]]:
        accelerator = Accelerator(cpu=True)
        model = meft_ds.inject(tiny_model(), MEFT)
        sparse = meft_ds.SparseRowAdam(meft_ds.adapters(model), lr=1e-2)
        dense = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model, sparse, dense = accelerator.prepare(model, sparse, dense)
        return accelerator, model, [sparse, dense]

    def train(accelerator: Accelerator, model: Any, optimizers: list[Any], steps: range) -> None:
        for step in steps:
            batch = token_batch(batch=2, length=8, seed=step)
            accelerator.backward(model(batch, labels=batch).loss)
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad()

    with fresh_accelerate():
        straight = prepared()
        train(*straight, range(3))
        straight[0].save_state(str(tmp_path))
        train(*straight, range(3, 6))
    with fresh_accelerate():
        resumed = prepared()
        resumed[0].load_state(str(tmp_path))
        train(*resumed, range(3, 6))
    assert all(map(torch.equal, store_rows(straight[1]), store_rows(resumed[1])))
