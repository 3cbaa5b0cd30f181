"""The Hugging Face Trainer with meft_ds: :class:`MeftTrainer` in place of ``transformers.Trainer``.

    args = TrainingArguments(output_dir="out", deepspeed="ds_configs/meft.json", ...)
    trainer = meft_ds.hf.MeftTrainer(model=model, args=args, train_dataset=data)
    trainer.train()  # or trainer.train(resume_from_checkpoint=True)

The Trainer builds its DeepSpeed engine (through Accelerate) inside ``train()`` and, when resuming, loads the
engine's checkpoint right away, before the first callback event of the run (``on_train_begin``): a callback would
attach too late for the row store to come back with the checkpoint. The Trainer loads that checkpoint through
``trainer.model_wrapped`` (``deepspeed_load_checkpoint(self.model_wrapped, ...)``), so it sets that attribute to the
engine first; :class:`MeftTrainer` attaches the plugin (:func:`meft_ds.attach`) the moment it does. From then on the
Trainer's own calls do the work: ``accelerator.backward`` calls ``engine.step()`` (the rows step at each optimizer
step, with the Trainer's learning-rate schedule), checkpoints call ``engine.save_checkpoint`` (the rows are saved in
the same folder) and ``resume_from_checkpoint`` calls ``engine.load_checkpoint`` (the rows come back).

``trainer.save_model(dir)`` (and the copy the Trainer saves into every ``checkpoint-N``) writes the trained adapter in
PEFT's layout (:mod:`meft_ds.export`: ``adapter_config.json``, ``adapter_model.safetensors``), with the tokenizer and
the training arguments, and not the frozen base model's weights (a PEFT model's own adapters, e.g. LoRA beside MEFT,
go to ``<dir>/peft``); ``meft_ds.MeftModel.from_pretrained(base, dir)`` loads it, PEFT's part included.

This module imports ``transformers``; the core of meft_ds does not.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from deepspeed import DeepSpeedEngine
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME

from meft_ds.config import MeftConfig, MeftConfigError
from meft_ds.ds_config import AUTO, check_optimizer
from meft_ds.engine import attach
from meft_ds.export import save_adapter, save_peft_adapters, without_meft_wrapper
from meft_ds.inject import adapters, follow_peft_disable, inject, warn_settings_not_used, without_peft_wrapper

# meft keys whose default is "auto": in a "meft" section, "auto" there means "the default"
_AUTO_DEFAULT_KEYS = frozenset(f.name for f in dataclasses.fields(MeftConfig) if f.default == AUTO)


class MeftTrainer(Trainer):
    """``transformers.Trainer`` whose DeepSpeed engine also steps, saves and restores the meft row stores.

    Takes the Trainer's arguments, plus ``meft`` (a dict or :class:`meft_ds.MeftConfig`). A model without adapters
    gets them from ``meft``, else from the ``"meft"`` section of the DeepSpeed config (``--deepspeed`` or the
    ``accelerate launch`` config); a model that already has adapters (:func:`meft_ds.inject`,
    ``MeftModel.from_pretrained``: trained on, as the model it wraps) keeps them. DeepSpeed must be on: it is what
    steps the rows. For another Trainer subclass (e.g. TRL's ``SFTTrainer`` or ``DPOTrainer``), list this class
    first: ``class MySFTTrainer(MeftTrainer, SFTTrainer)``.
    """

    def __init__(self, *args: Any, meft: MeftConfig | dict | None = None, **kwargs: Any) -> None:
        # the arguments go on as given (a Trainer subclass listed after this one has its own signature), a MeftModel
        # as the model it wraps (see without_meft_wrapper)
        if "model" in kwargs:
            kwargs["model"] = without_meft_wrapper(kwargs["model"])
        elif args:
            args = (without_meft_wrapper(args[0]), *args[1:])
        self._meft_config: MeftConfig | None = None  # read from the DeepSpeed config the Trainer resolves, below
        super().__init__(*args, **kwargs)
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if plugin is None:
            raise MeftConfigError(
                "MeftTrainer: DeepSpeed is off, and it is DeepSpeed's step that updates the meft row stores. Fix: pass "
                "TrainingArguments(deepspeed='ds_configs/meft.json', ...) (--deepspeed on the command line), or run "
                "under `accelerate launch` with a DeepSpeed config."
            )
        ds_config = plugin.hf_ds_config.config
        check_optimizer(ds_config)  # now, not when train() builds the engine
        section = ds_config.get("meft")
        self._meft_config = MeftConfig.from_dict(meft if meft is not None else section)
        if isinstance(section, dict):
            _drop_auto_defaults(section)
        if adapters(self.model) and (meft is not None or section is not None):
            warn_settings_not_used(self.model, self._meft_config, from_argument=meft is not None)
        self._with_adapters(self.model)

    def call_model_init(self, trial: Any = None) -> Any:
        """The model of ``model_init``, with the adapters: the Trainer makes it again at every ``train()`` (and per
        trial of a hyperparameter search), after ``__init__`` has added them to the first."""
        model = super().call_model_init(trial)
        return model if self._meft_config is None else self._with_adapters(model)

    def _with_adapters(self, model: Any) -> Any:
        """``model`` with adapters: injected with the settings given unless it has some (which it keeps)."""
        if not adapters(model):
            return inject(model, self._meft_config)
        follow_peft_disable(model)  # adapters injected before a subclass (TRL's peft_config) wrapped the model
        return model

    @property
    def model_wrapped(self) -> Any:
        return self._meft_model_wrapped

    @model_wrapped.setter
    def model_wrapped(self, model: Any) -> None:
        """The Trainer sets this to its DeepSpeed engine right after creating it, before loading a checkpoint."""
        self._meft_model_wrapped = model
        if isinstance(model, DeepSpeedEngine):
            attach(model)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write the trained adapter (:func:`meft_ds.save_adapter`), the tokenizer and the training arguments.

        The Trainer calls this on every rank (for each ``checkpoint-N``, and scripts call ``trainer.save_model()`` at
        the end): every rank takes part in gathering sharded stores' rows, the writing rank (``args.should_save``)
        writes. The base model's weights are not written: they are frozen, and ``adapter_config.json`` names them
        (``base_model_name_or_path``), as a PEFT adapter does. A PEFT model's own adapters (LoRA beside MEFT) go to
        ``<output_dir>/peft``, as PEFT saves them (its files have the names of MEFT's). Resuming needs none of this:
        the DeepSpeed checkpoint in ``checkpoint-N/global_stepN`` holds the routers and the row store.
        """
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        save_adapter(self.model, output_dir, is_main_process=self.args.should_save)
        if without_peft_wrapper(self.model) is not self.model:  # PEFT's adapters beside MEFT's (e.g. LoRA)
            engine = getattr(self, "deepspeed", None)  # (None before train(): the model's own state then)
            state_dict = self.accelerator.get_state_dict(engine) if engine is not None else None  # ZeRO-3: gathered
            save_peft_adapters(self.model, output_dir, is_main_process=self.args.should_save, state_dict=state_dict)
        if self.args.should_save:
            tokenizer = getattr(self, "processing_class", None) or getattr(self.data_collator, "tokenizer", None)
            if tokenizer is not None:
                tokenizer.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        if self.args.push_to_hub and not _internal_call:
            revision = getattr(self.args, "hub_revision", None)
            self.push_to_hub(commit_message="Model save", **({"revision": revision} if revision else {}))


def _drop_auto_defaults(section: dict[str, Any]) -> None:
    """Remove ``"key": "auto"`` entries whose meaning is the key's default (``row_dtype``), in place: Accelerate fills
    every ``"auto"`` of the DeepSpeed config it hands to DeepSpeed and raises on one it does not know, and the
    ``"meft"`` section travels in that config (DeepSpeed ignores it)."""
    for key in [key for key, value in section.items() if value == AUTO and key in _AUTO_DEFAULT_KEYS]:
        del section[key]
