"""meft_ds.hf.MeftTrainer in-process (one rank, ds_configs/meft.json: ZeRO-2 + CPU offload, "auto" values filled by
the Trainer): the rows learn at every optimizer step with the Trainer's learning-rate schedule, the Trainer's
checkpoints hold the store, resuming from one continues the same run, and ``trainer.save_model`` (and the Trainer's
export into each checkpoint) writes the whole adapter, which a fresh base model reloads to identical logits."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hf_support import MEFT, batch_loss, collator, features, fresh_accelerate, meft_json, store_rows
from safetensors.torch import load_file
from tiny_models import tiny_model, word_tokenizer
from transformers import Trainer, TrainerCallback, TrainingArguments

import meft_ds
import meft_ds.adapter
from meft_ds import adapters
from meft_ds.hf import MeftTrainer

STEPS, SAVE_EVERY, LR = 6, 3, 1e-2


@pytest.fixture(autouse=True)
def _clean_accelerate() -> Iterator[None]:
    with fresh_accelerate():
        yield


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return word_tokenizer(chat=True)


class Recorder(TrainerCallback):
    """Per optimizer step, the routers' learning rate and the rows' (the plugin's); the store when saved or resumed."""

    def __init__(self) -> None:
        self.trainer: MeftTrainer | None = None
        self.dense_lr: list[float] = []
        self.row_lr: list[float] = []
        self.grad_norm: list[float | None] = []  # the plugin's norm before clipping: the routers' and the rows'
        self.rows_at: dict[int, list[torch.Tensor]] = {}
        self.routers_at: dict[int, list[torch.Tensor]] = {}

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.rows_at[state.global_step] = store_rows(self.trainer.model)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.dense_lr.append(self.trainer.model_wrapped.get_lr()[0])

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.row_lr.append(self.trainer.model_wrapped.meft.last_lr)
        self.grad_norm.append(self.trainer.model_wrapped.meft.last_grad_norm)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.rows_at[state.global_step] = store_rows(self.trainer.model)
        self.routers_at[state.global_step] = [a.router.weight.detach().clone() for a in adapters(self.trainer.model)]


def make_trainer(tokenizer: Any, output_dir: Path, config: dict | None = None, **kwargs: Any) -> tuple[Any, Recorder]:
    args = TrainingArguments(
        output_dir=str(output_dir), deepspeed=config or meft_json(), max_steps=STEPS, save_steps=SAVE_EVERY,
        learning_rate=LR, warmup_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        logging_steps=1, report_to=[], disable_tqdm=True, seed=0,
    )  # fmt: skip
    recorder = Recorder()
    trainer = MeftTrainer(
        model=kwargs.pop("model", None) or tiny_model(), args=args, train_dataset=features(tokenizer),
        data_collator=collator(tokenizer), processing_class=tokenizer, callbacks=[recorder], **kwargs,
    )  # fmt: skip
    recorder.trainer = trainer
    return trainer, recorder


def logged(trainer: MeftTrainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def check_saved_adapter(trainer: MeftTrainer, log: Recorder, final: Path, tokenizer: Any) -> None:
    """``trainer.save_model(final)`` wrote the whole adapter (not the frozen base model), with the tokenizer and the
    training arguments, and a fresh base model reloads it to identical logits; the Trainer's own export into
    checkpoint-N is the adapter as it was at that step."""
    trainer.save_model(str(final))
    assert {"adapter_config.json", "adapter_model.safetensors", "training_args.bin", "tokenizer.json"} <= {
        p.name for p in final.iterdir()
    }
    assert not list(final.glob("model*.safetensors")), "the frozen base model is not saved"
    assert json.loads((final / "adapter_config.json").read_text())["peft_type"] == "MEFT"
    batch = collator(tokenizer)(features(tokenizer, 4))
    trained = trainer.model.eval()
    fresh = meft_ds.MeftModel.from_pretrained(tiny_model().to(trained.dtype), final)
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, trained(**batch).logits)
    at_save = meft_ds.load_adapter(tiny_model(), Path(trainer.args.output_dir) / f"checkpoint-{SAVE_EVERY}")
    for adapter, rows, router in zip(
        adapters(at_save), log.rows_at[SAVE_EVERY], log.routers_at[SAVE_EVERY], strict=True
    ):
        assert torch.equal(adapter.store.rows, rows)
        assert torch.equal(adapter.router.weight, router.float())


def test_trains_with_the_schedule_checkpoints_saves_and_resumes_the_same_run(tmp_path: Path, tokenizer: Any) -> None:
    straight, log = make_trainer(tokenizer, tmp_path / "straight")
    initial_rows = store_rows(straight.model)
    before = batch_loss(straight.model, tokenizer)
    straight.train()

    # the sparse Adam stepped once per optimizer step (gradient accumulation 2), with the Trainer's schedule
    assert straight.model_wrapped.meft.sparse_optimizer.state_dict()["global_step"] == STEPS
    assert straight.model_wrapped.config["meft"] == {k: v for k, v in MEFT.items() if k != "row_dtype"}
    assert log.row_lr == log.dense_lr
    assert log.row_lr[0] == 0.0 and max(log.row_lr) == pytest.approx(LR) and log.row_lr[-1] < LR  # warmup, decay
    assert log.row_lr[1:] == pytest.approx(logged(straight, "learning_rate")[:-1])  # HF logs the lr of the next step
    # the Trainer logs the norm it clipped by, the rows' gradients included (DeepSpeed's own would be the routers',
    # read after the plugin clipped them: 0 until the values leave zero, at most max_grad_norm afterwards)
    assert all(norm > 0 for norm in log.grad_norm) and logged(straight, "grad_norm") == pytest.approx(log.grad_norm)
    # the rows learned, and the loss fell
    assert all(not torch.equal(a, b) for a, b in zip(store_rows(straight.model), initial_rows, strict=True))
    assert batch_loss(straight.model, tokenizer) < before
    # the Trainer's checkpoint holds the store as it was at the save
    store = tmp_path / "straight" / f"checkpoint-{SAVE_EVERY}" / f"global_step{SAVE_EVERY}" / "meft"
    for adapter, saved in zip(meft_ds.adapters(straight.model), log.rows_at[SAVE_EVERY], strict=True):
        assert torch.equal(load_file(str(store / f"layer_{adapter.layer_index}.safetensors"))["rows"], saved)
    check_saved_adapter(straight, log, tmp_path / "final", tokenizer)

    resumed, resumed_log = make_trainer(tokenizer, tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / f"checkpoint-{SAVE_EVERY}"))
    for after_load, at_save in zip(resumed_log.rows_at[SAVE_EVERY], log.rows_at[SAVE_EVERY], strict=True):
        assert torch.equal(after_load, at_save)
    assert resumed_log.row_lr == log.row_lr[SAVE_EVERY:]
    assert logged(resumed, "loss") == pytest.approx(logged(straight, "loss"), rel=1e-5)  # history includes the first 3
    for a, b in zip(store_rows(resumed.model), store_rows(straight.model), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_meft_settings_from_the_config_a_dict_a_meft_config_or_the_model(
    tmp_path: Path, tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from_section, _ = make_trainer(tokenizer, tmp_path / "a")
    assert meft_ds.adapters(from_section.model)[0].config.num_neurons == MEFT["num_neurons"]
    assert "row_dtype" not in from_section.args.hf_deepspeed_config.config["meft"]  # "auto" would stop Accelerate
    from_dict, _ = make_trainer(tokenizer, tmp_path / "b", meft_json(None), meft={"num_neurons": 32, "top_k": 2})
    assert meft_ds.adapters(from_dict.model)[0].config.num_neurons == 32
    from_config, _ = make_trainer(tokenizer, tmp_path / "c", meft=meft_ds.MeftConfig(16, top_k=2, layers=[1]))
    assert [a.layer_index for a in meft_ds.adapters(from_config.model)] == [1]
    injected = meft_ds.inject(tiny_model(), {"num_neurons": 8, "top_k": 2})
    with caplog.at_level(logging.WARNING, logger="meft_ds"):
        kept, _ = make_trainer(tokenizer, tmp_path / "d", model=injected)
    assert kept.model is injected and meft_ds.adapters(injected)[0].config.num_neurons == 8
    assert "these of the DeepSpeed config's meft section differ and take no effect: num_neurons=64" in caplog.text


def test_an_optimizer_parameter_deepspeed_would_refuse_is_named_when_the_trainer_is_made(
    tmp_path: Path, tokenizer: Any
) -> None:
    config = meft_json()
    config["optimizer"]["params"]["betaz"] = [0.9, 0.99]
    with pytest.raises(meft_ds.MeftConfigError, match=r"^optimizer\.params\.betaz: .*did you mean 'betas'\?"):
        make_trainer(tokenizer, tmp_path, config)


def test_without_deepspeed_it_says_how_to_turn_it_on(tmp_path: Path) -> None:
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    with pytest.raises(meft_ds.MeftConfigError, match=r"DeepSpeed is off.*deepspeed='ds_configs/meft.json'"):
        MeftTrainer(model=tiny_model(), args=args)


def test_a_peft_model_trains_lora_beside_meft_and_save_model_writes_both(tmp_path: Path, tokenizer: Any) -> None:
    """A PEFT model (LoRA on the attention) given to MeftTrainer gets MEFT on its FFNs and trains both; save_model
    wrote MEFT's adapter alone, and LoRA's was lost. PEFT's files go to <output_dir>/peft."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lora = {name: p.detach().clone() for name, p in model.named_parameters() if "lora_B" in name}
    trainer, _ = make_trainer(tokenizer, tmp_path / "run", model=model)
    trainer.train()
    assert all(not torch.equal(p, lora[name]) for name, p in model.named_parameters() if name in lora)
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "peft" / "adapter_model.safetensors").is_file()
    reloaded = meft_ds.MeftModel.from_pretrained(tiny_model(), tmp_path / "final")  # both parts
    batch = collator(tokenizer)(features(tokenizer, 4))
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(**batch).logits, model.eval()(**batch).logits)
        with model.disable_adapter(), reloaded.get_base_model().disable_adapter():  # PEFT's, MEFT's adapters off too
            assert torch.equal(reloaded(**batch).logits, tiny_model().eval()(**batch).logits)
            assert torch.equal(model(**batch).logits, tiny_model().eval()(**batch).logits)


def test_a_loaded_adapter_trains_on_as_the_model_it_wraps(tmp_path: Path, tokenizer: Any) -> None:
    """A MeftModel (MeftModel.from_pretrained) given to MeftTrainer stopped at the first batch with KeyError:
    'input_ids': the Trainer keeps the dataset columns that the model's forward names, and the wrapper's names none."""
    exported = meft_ds.inject(tiny_model(), MEFT)
    for adapter in adapters(exported):
        adapter.store.rows[:, 1].normal_(std=0.02, generator=torch.Generator().manual_seed(adapter.layer_index))
    meft_ds.save_adapter(exported, tmp_path / "adapter")
    loaded = meft_ds.MeftModel.from_pretrained(tiny_model(), tmp_path / "adapter")
    trainer, _ = make_trainer(tokenizer, tmp_path / "run", model=loaded)
    trainer.train()
    assert all(not torch.equal(a, b) for a, b in zip(store_rows(loaded), store_rows(exported), strict=True))
    assert trainer.model_wrapped.module is loaded.get_base_model()  # names in checkpoints without "base_model."


def test_a_model_init_s_model_gets_the_adapters_at_every_train(tmp_path: Path, tokenizer: Any) -> None:
    """With model_init (a hyperparameter search's), the Trainer makes the model again at train(): it came without
    adapters, and attach refused the engine, telling a MeftTrainer user to call inject."""
    args = TrainingArguments(output_dir=str(tmp_path), deepspeed=meft_json(), max_steps=4, learning_rate=LR,
                             per_device_train_batch_size=2, report_to=[], save_strategy="no")  # fmt: skip
    trainer = MeftTrainer(model_init=lambda: tiny_model(), args=args, train_dataset=features(tokenizer),
                          data_collator=collator(tokenizer))  # fmt: skip
    first = trainer.model
    trainer.train()
    assert trainer.model is not first and [a.layer_index for a in adapters(trainer.model)] == [0, 1]
    trained, fresh = store_rows(trainer.model), store_rows(first)
    assert all(not torch.equal(a, b) for a, b in zip(trained, fresh, strict=True))


def test_mixed_into_a_trainer_with_other_arguments_that_wraps_the_model_in_peft(tmp_path: Path, tokenizer: Any) -> None:
    """MeftTrainer passed its model= and args= on as the first two positions, so a subclass listed after it with
    others (TRL's DPOTrainer(model, ref_model, args, ...)) got args twice, once as its reference model. And a
    subclass that wraps the model in PEFT (TRL's peft_config) after meft_ds.inject made a PEFT model whose
    disable_adapter() left MEFT on."""
    from peft import LoraConfig, get_peft_model

    class WithReference(Trainer):
        def __init__(self, model: Any, ref_model: Any = None, args: Any = None, **kwargs: Any) -> None:
            self.ref_model = ref_model
            super().__init__(get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"])), args, **kwargs)

    class MeftWithReference(MeftTrainer, WithReference):
        pass

    args = TrainingArguments(output_dir=str(tmp_path), deepspeed=meft_json(), report_to=[])
    reference = tiny_model()
    trainer = MeftWithReference(model=meft_ds.inject(tiny_model(), MEFT), ref_model=reference, args=args,
                                train_dataset=features(tokenizer))  # fmt: skip
    assert trainer.ref_model is reference and trainer.args is args
    with trainer.model.disable_adapter():
        assert trainer.model._adapters_disabled and all(a.disabled for a in adapters(trainer.model))
    assert not any(a.disabled for a in adapters(trainer.model))


def test_load_best_model_at_end_brings_the_row_store_back_with_the_best_checkpoint(
    tmp_path: Path, tokenizer: Any
) -> None:
    """The Trainer loads the best checkpoint through the engine (deepspeed_load_checkpoint): the rows come back with
    the routers. Here the best is the first checkpoint (greater_is_better on the loss), and save_total_limit=1 keeps
    it while the last one is rotated out."""
    args = TrainingArguments(
        output_dir=str(tmp_path), deepspeed=meft_json(), max_steps=STEPS, save_steps=SAVE_EVERY,
        eval_strategy="steps", eval_steps=SAVE_EVERY, load_best_model_at_end=True, metric_for_best_model="eval_loss",
        greater_is_better=True, save_total_limit=1, learning_rate=LR, per_device_train_batch_size=2, report_to=[],
        disable_tqdm=True, seed=0,
    )  # fmt: skip
    recorder = Recorder()
    trainer = MeftTrainer(
        model=tiny_model(), args=args, train_dataset=features(tokenizer), eval_dataset=features(tokenizer, 8),
        data_collator=collator(tokenizer), processing_class=tokenizer, callbacks=[recorder],
    )  # fmt: skip
    recorder.trainer = trainer
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(tmp_path / f"checkpoint-{SAVE_EVERY}")
    assert not all(map(torch.equal, recorder.rows_at[STEPS], recorder.rows_at[SAVE_EVERY])), "the rows moved on"
    for rows, at_best in zip(store_rows(trainer.model), recorder.rows_at[SAVE_EVERY], strict=True):
        assert torch.equal(rows, at_best)
    for adapter, at_best in zip(adapters(trainer.model), recorder.routers_at[SAVE_EVERY], strict=True):
        assert torch.equal(adapter.router.weight, at_best)


def test_transformers_own_trainer_is_told_that_nothing_steps_the_rows(
    tmp_path: Path, tokenizer: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An injected model given to transformers' Trainer (not MeftTrainer) trained nothing: the rows' gradients
    accumulated and were never applied, and with the values at zero the routers got no gradient either."""
    from transformers import Trainer

    monkeypatch.setattr(meft_ds.adapter, "_warned_unstepped", False)
    model = meft_ds.inject(tiny_model(), MEFT)
    args = TrainingArguments(
        output_dir=str(tmp_path), deepspeed=meft_json(meft=None), max_steps=2, learning_rate=LR,
        per_device_train_batch_size=2, report_to=[], disable_tqdm=True, save_strategy="no",
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=features(tokenizer), data_collator=collator(tokenizer))
    rows = store_rows(model)
    with caplog.at_level(logging.WARNING, logger="meft_ds"):
        trainer.train()
    assert all(map(torch.equal, rows, store_rows(model))), "nothing stepped the rows"
    assert "no SparseRowAdam steps its rows" in caplog.text and "meft_ds.hf.MeftTrainer" in caplog.text

    caplog.clear()
    monkeypatch.setattr(meft_ds.adapter, "_warned_unstepped", False)
    with fresh_accelerate(), caplog.at_level(logging.WARNING, logger="meft_ds"):
        make_trainer(tokenizer, tmp_path / "meft")[0].train()
    assert "no SparseRowAdam" not in caplog.text
