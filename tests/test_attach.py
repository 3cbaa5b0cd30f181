"""The three ways into an existing DeepSpeed loop train identically: ``meft_ds.initialize`` with the settings in the
config's "meft" section (given as a dict or as the path a DeepSpeed launcher puts in ``args.deepspeed_config``) or in
``meft=`` (a dict or a MeftConfig), and ``meft_ds.inject`` + ``deepspeed.initialize`` + ``meft_ds.attach``."""

from __future__ import annotations

import json
import types
from argparse import Namespace
from collections.abc import Callable
from pathlib import Path
from typing import Any

import deepspeed
import pytest
import torch
from tiny_models import tiny_model, token_batch

import meft_ds
import meft_ds.engine

MEFT = {"num_neurons": 64, "top_k": 4, "seed": 3}
CONFIG = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_clipping": 1.0,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 2, "total_num_steps": 4}},
    "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
}


def from_section(model: torch.nn.Module) -> Any:
    return meft_ds.initialize(model=model, config={**CONFIG, "meft": MEFT})[0]


def from_dict(model: torch.nn.Module) -> Any:
    return meft_ds.initialize(model=model, config=CONFIG, meft=MEFT)[0]


def from_meft_config(model: torch.nn.Module) -> Any:
    return meft_ds.initialize(model=model, config=CONFIG, meft=meft_ds.MeftConfig(**MEFT))[0]


def attached(model: torch.nn.Module) -> Any:
    meft_ds.inject(model, meft_ds.MeftConfig(**MEFT))
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=CONFIG)
    plugin = meft_ds.attach(engine)
    assert meft_ds.attach(engine) is plugin is engine.meft
    return engine


def train(make_engine: Callable[[torch.nn.Module], Any]) -> tuple[torch.nn.Module, list[float]]:
    model = tiny_model()
    engine = make_engine(model)
    losses = []
    for step in range(4):
        batch = token_batch(batch=2, length=12, seed=step)
        loss = engine(batch, labels=batch).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert engine.meft.sparse_optimizer.state_dict()["global_step"] == 4
    return model, losses


def test_initialize_with_any_meft_source_and_attach_train_identically(tmp_path: Path) -> None:
    untouched = meft_ds.inject(tiny_model(), MEFT)
    reference, losses = train(from_section)
    assert meft_ds.stats(reference)["rows_updated"] > 0
    for a, b in zip(meft_ds.adapters(reference), meft_ds.adapters(untouched), strict=True):
        assert not torch.equal(a.store.rows, b.store.rows)

    def from_args(model: torch.nn.Module) -> Any:
        """As a script launched with ``deepspeed script.py --deepspeed ds.json`` passes it: a path in the arguments."""
        path = tmp_path / "ds.json"
        path.write_text(json.dumps({**CONFIG, "meft": MEFT}))
        args = Namespace(deepspeed_config=str(path), local_rank=0)
        engine = meft_ds.initialize(args=args, model=model)[0]
        assert args.deepspeed_config == str(path), "the caller's arguments are left as they were"
        return engine

    for make_engine in (from_dict, from_meft_config, from_args, attached):
        model, other_losses = train(make_engine)
        assert other_losses == losses, make_engine.__name__
        for a, b in zip(meft_ds.adapters(model), meft_ds.adapters(reference), strict=True):
            assert torch.equal(a.store.rows, b.store.rows), make_engine.__name__


def test_an_engine_whose_data_parallel_group_is_not_the_world_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensor or pipeline parallelism (an mpu) makes the data-parallel group smaller than the world; the row stores
    are replicated or sharded over every rank, so such an engine is refused, naming the fix."""
    engine = attached(tiny_model())
    del engine.meft  # attach anew
    model_parallel = object()  # the data-parallel group of an engine with an mpu: half of the (pretended) 2 ranks
    monkeypatch.setattr(engine, "data_parallel_group", model_parallel, raising=False)
    monkeypatch.setattr(meft_ds.engine.dist, "get_world_size", lambda group=None: 1 if group is model_parallel else 2)
    with pytest.raises(meft_ds.MeftConfigError, match=r"holds 1 of the 2 ranks .* Fix: train data-parallel only"):
        meft_ds.attach(engine)
    monkeypatch.undo()  # the whole world data-parallel again
    assert isinstance(meft_ds.attach(engine), meft_ds.MeftPlugin)


def test_initialize_and_attach_name_what_is_missing() -> None:
    with pytest.raises(meft_ds.MeftConfigError, match=r"model is required\. Fix: pass model="):
        meft_ds.initialize(model=None, config=CONFIG)
    with pytest.raises(meft_ds.MeftConfigError, match=r"no DeepSpeed config\. Fix: pass config="):
        meft_ds.initialize(model=tiny_model(), args=Namespace(local_rank=0))
    plain = types.SimpleNamespace(module=tiny_model())  # an engine of a model without adapters
    with pytest.raises(meft_ds.MeftConfigError, match=r"no meft adapters\. Fix: call meft_ds\.inject"):
        meft_ds.attach(plain)
