"""Checkpoints of meft_ds.initialize in-process (one rank): they restore the store and continue identically at ZeRO
stages 0-3, refuse what does not fit (other adapter shapes, other trainable parameters, another base model) before
anything loads, and exported adapters reload into a fresh base model to identical logits."""

from __future__ import annotations

import pytest
import torch
from engine_support import MEFT, assert_same_training, batches, ds_config, train_with_engine
from tiny_models import tiny_model, token_batch

import meft_ds


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_checkpoint_round_trip_restores_store_and_continues_identically(tmp_path, stage: int) -> None:
    config = ds_config(stage)
    straight, _, straight_losses, *_ = train_with_engine(config, steps=6)

    model = tiny_model()
    engine, *_ = meft_ds.initialize(model=model, config=config)
    data = batches(6)
    for batch in data[:3]:
        engine.backward(engine(batch, labels=batch).loss)
        engine.step()
    engine.save_checkpoint(str(tmp_path))
    assert (tmp_path / "latest").read_text() == "global_step3"
    assert (tmp_path / "global_step3" / "meft" / "layer_0.safetensors").is_file()
    # the frozen base model is not saved (it never changes): the module state holds the routers only
    (states,) = (tmp_path / "global_step3").glob("*model_states.pt")  # ZeRO-3 names it after the rank too
    saved = torch.load(states, weights_only=False)
    assert set(saved["module"]) == {name for name, p in model.named_parameters() if p.requires_grad}
    assert not saved.get("frozen_param_fragments")

    resumed_model = tiny_model()
    resumed, *_ = meft_ds.initialize(model=resumed_model, config=config)
    resumed.load_checkpoint(str(tmp_path))
    assert resumed.global_steps == 3 and resumed.meft.sparse_optimizer.global_step == 3
    for a, b in zip(meft_ds.adapters(model), meft_ds.adapters(resumed_model), strict=True):
        assert torch.equal(a.store.rows, b.store.rows) and torch.equal(a.store.exp_avg_sq, b.store.exp_avg_sq)
    losses = []
    for batch in data[3:]:
        loss = resumed(batch, labels=batch).loss
        resumed.backward(loss)
        resumed.step()
        losses.append(loss.item())
    assert losses == pytest.approx(straight_losses[3:], abs=1e-6)
    assert_same_training(resumed_model, straight, atol=1e-6)


def test_loading_from_a_folder_without_a_checkpoint_changes_nothing(tmp_path) -> None:
    """As DeepSpeed's own: no checkpoint there (a first run's resume) returns ``(None, None)``, and nothing loads."""
    model = tiny_model()
    engine, *_ = meft_ds.initialize(model=model, config=ds_config(2))
    rows = [a.store.rows.clone() for a in meft_ds.adapters(model)]
    assert engine.load_checkpoint(str(tmp_path)) == (None, None)
    assert engine.global_steps == 0
    assert all(torch.equal(a.store.rows, r) for a, r in zip(meft_ds.adapters(model), rows, strict=True))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_neurons": 128}, r"meft\.num_neurons is 64 in the checkpoint, 128 in this run\. Fix: resume with the"),
        ({"num_experts": 16}, r"meft\.num_experts is 32 in the checkpoint, 16 in this run\. Fix: resume with the"),
        (  # a checkpoint without the settings (written before they were saved): its row files tell
            {"num_neurons": 128, "settings": None},
            r"layer 0's saved rows \{'layer_0\.safetensors': \(64, 2, 64\)\} do not make the \(128, 2, 64\).* Fix",
        ),
    ],
    ids=["rows", "routers", "older checkpoint"],
)
def test_resuming_with_other_adapter_shapes_is_refused_before_anything_loads(
    tmp_path, change: dict, message: str
) -> None:
    engine, *_ = meft_ds.initialize(model=tiny_model(), config=ds_config(2))
    engine.save_checkpoint(str(tmp_path))
    if "settings" in change:
        (tmp_path / "global_step0" / "meft" / "meft_settings.json").unlink()
    other = tiny_model()
    meft = {**MEFT, **{k: v for k, v in change.items() if k != "settings"}}
    resumed, *_ = meft_ds.initialize(model=other, config={**ds_config(2), "meft": meft})
    before = {name: p.detach().clone() for name, p in other.named_parameters()}
    rows = [a.store.rows.clone() for a in meft_ds.adapters(other)]
    with pytest.raises(meft_ds.CheckpointError, match=message):
        resumed.load_checkpoint(str(tmp_path))
    assert all(torch.equal(p, before[name]) for name, p in other.named_parameters())
    assert all(torch.equal(a.store.rows, r) for a, r in zip(meft_ds.adapters(other), rows, strict=True))


def test_saving_a_tag_again_replaces_it_whole(tmp_path) -> None:
    """A tag saved twice (e.g. ``tag="best"``) holds the second save once it returns: the first version is moved
    aside only while the second is published, and nothing of either is left beside it."""
    config = ds_config(2)
    model = tiny_model()
    engine, *_ = meft_ds.initialize(model=model, config=config)
    for batch in batches(2):
        engine.backward(engine(batch, labels=batch).loss)
        engine.step()
        engine.save_checkpoint(str(tmp_path), tag="best")
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == ["best"]  # no "best.old", no staging folder

    resumed_model = tiny_model()
    resumed, *_ = meft_ds.initialize(model=resumed_model, config=config)
    resumed.load_checkpoint(str(tmp_path), tag="best")
    assert resumed.global_steps == 2
    for a, b in zip(meft_ds.adapters(model), meft_ds.adapters(resumed_model), strict=True):
        assert torch.equal(a.store.rows, b.store.rows) and torch.equal(a.store.exp_avg, b.store.exp_avg)


def test_a_checkpoint_of_other_trainable_parameters_is_refused(tmp_path) -> None:
    """Frozen parameters may be missing from a checkpoint (they are not saved); trainable ones may not, and nothing
    else may be there: the module state of adapters on other layers is refused with the fix. Asked for, the frozen
    parameters are saved and load as before."""
    config = ds_config(2)
    engine, *_ = meft_ds.initialize(model=tiny_model(), config=config)
    engine.save_checkpoint(str(tmp_path / "a"))
    engine.save_checkpoint(str(tmp_path / "b"), exclude_frozen_parameters=False)
    saved = torch.load(tmp_path / "b" / "global_step0" / "mp_rank_00_model_states.pt", weights_only=False)
    assert len(saved["module"]) == len(list(engine.module.parameters()))
    other, *_ = meft_ds.initialize(model=tiny_model(), config={**config, "meft": {**MEFT, "layers": [1]}})
    refused = r"unexpected \['meft_adapters\.0\.router\.weight'\].*Fix: resume"
    with pytest.raises(meft_ds.CheckpointError, match=refused):
        other.load_checkpoint(str(tmp_path / "a"))
    same, *_ = meft_ds.initialize(model=tiny_model(), config=config)
    assert same.load_checkpoint(str(tmp_path / "b"))[0] is not None


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("save", ["save_adapter", "save_16bit_model"])
def test_exported_adapter_reloads_into_a_fresh_base_model(tmp_path, stage: int, save: str) -> None:
    """Trained by the engine, exported, reloaded: identical logits. At ZeRO-3 the routers are partitioned (no
    persistence threshold here): the export gathers them. DeepSpeed's ``engine.save_16bit_model`` saved the module's
    parameters alone, without the rows: it writes the adapter too. Refusals and formats: tests/test_export.py."""
    config = ds_config(stage)
    if stage == 3:
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    run = train_with_engine(config, steps=3)
    if stage == 3:
        assert all(a.router.weight.numel() == 0 for a in meft_ds.adapters(run.model)), "routers partitioned"
    if save == "save_adapter":
        meft_ds.save_adapter(run.model, tmp_path)
    else:
        run.engine.save_16bit_model(str(tmp_path))
        assert (tmp_path / "pytorch_model.bin").is_file() == (stage < 3)  # ZeRO-3 needs gathering turned on
    batch = token_batch(batch=2, length=10, seed=99)
    run.engine.eval()
    with torch.no_grad():
        trained_logits = run.engine(batch).logits
        base_logits = tiny_model()(batch).logits
    assert not torch.allclose(trained_logits, base_logits), "training must have moved the model"
    fresh = meft_ds.load_adapter(tiny_model(), tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(batch).logits, trained_logits)


def test_a_tied_embedding_is_left_out_under_both_names(tmp_path) -> None:
    """GPT-2 ties its output layer to the embedding: DeepSpeed's exclusion of frozen parameters knows the weight by
    one name and kept it under the other (``lm_head.weight``). Neither is saved, and the checkpoint loads."""
    model = tiny_model("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    engine, *_ = meft_ds.initialize(model=model, config=ds_config(2))
    engine.save_checkpoint(str(tmp_path))
    saved = torch.load(tmp_path / "global_step0" / "mp_rank_00_model_states.pt", weights_only=False)
    assert set(saved["module"]) == {name for name, p in model.named_parameters() if p.requires_grad}
    resumed, *_ = meft_ds.initialize(model=tiny_model("gpt2"), config=ds_config(2))
    assert resumed.load_checkpoint(str(tmp_path))[0] is not None


@pytest.mark.parametrize("stage", [2, 3])
def test_resuming_on_another_base_model_is_refused(tmp_path, stage: int) -> None:
    """A checkpoint leaves the frozen base model out, so it keeps a sample of it: resuming on another base (one
    weight matrix moved by 1%, as another fine-tune would move it) is refused with the fix before anything loads; the
    same base resumes, and so does another one from a checkpoint that holds the base (it restores it: no sample
    kept). At ZeRO-3 the frozen parameters are partitioned (no persistence threshold): each is gathered."""
    config = ds_config(stage)
    if stage == 3:
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    run = train_with_engine(config, steps=2)
    run.engine.save_checkpoint(str(tmp_path / "a"))
    run.engine.save_checkpoint(str(tmp_path / "b"), exclude_frozen_parameters=False)
    if stage == 3:
        assert all(p.numel() == 0 for p in run.model.parameters()), "every parameter partitioned"
    assert not (tmp_path / "b" / "global_step2" / "meft" / "base_model_sample.pt").exists()

    def other_base() -> torch.nn.Module:
        model = tiny_model()
        with torch.no_grad():
            model.model.layers[1].mlp.up_proj.weight.mul_(1.01)
        return model

    other = other_base()
    engine, *_ = meft_ds.initialize(model=other, config=config)
    initial_rows = [a.store.rows.clone() for a in meft_ds.adapters(other)]
    with pytest.raises(meft_ds.CheckpointError, match=r"1 of \d+ frozen parameters .*up_proj.*Fix: resume with the"):
        engine.load_checkpoint(str(tmp_path / "a"))
    assert engine.global_steps == 0, "the engine's state is not loaded"
    for adapter, rows in zip(meft_ds.adapters(other), initial_rows, strict=True):
        assert torch.equal(adapter.store.rows, rows), "nor are the stores"
    restored, *_ = meft_ds.initialize(model=other_base(), config=config)
    assert restored.load_checkpoint(str(tmp_path / "b"))[0] is not None

    same, *_ = meft_ds.initialize(model=tiny_model(), config=config)
    assert same.load_checkpoint(str(tmp_path / "a"))[0] is not None
    assert same.meft.sparse_optimizer.global_step == 2


def test_the_base_model_sample_tells_other_weights_from_another_dtype(tmp_path) -> None:
    """The same weights in another dtype (a run saved in fp32, resumed in bf16) match; weights moved by less than
    bf16's resolution in the same dtype do not, nor do other parameter names."""
    from meft_ds.checkpoint import base_sample, check_base_sample, save_base_sample

    def frozen(model: torch.nn.Module) -> torch.nn.Module:
        return model.requires_grad_(False)

    saved = base_sample(frozen(tiny_model()))
    assert [len(v) for v in saved.values()] == [min(64, p.numel()) for p in tiny_model().parameters()]
    large = torch.nn.Module()  # past 2**24 elements, where a float32 position no longer names each element
    large.weight = torch.nn.Parameter(torch.arange(2**24 + 2, dtype=torch.int32), requires_grad=False)
    assert base_sample(large)["weight"][[0, -1]].tolist() == [0, 2**24 + 1]
    save_base_sample(tmp_path, saved)
    check_base_sample(tmp_path, base_sample(frozen(tiny_model().bfloat16())))
    nudged = frozen(tiny_model())
    with torch.no_grad():
        nudged.model.norm.weight.add_(1e-4)
    with pytest.raises(meft_ds.CheckpointError, match=r"1 of \d+ frozen parameters .*\(first: model\.norm\.weight\)"):
        check_base_sample(tmp_path, base_sample(nudged))
    with pytest.raises(meft_ds.CheckpointError, match="not those the checkpoint was trained on"):
        check_base_sample(tmp_path, {f"x.{name}": values for name, values in saved.items()})
