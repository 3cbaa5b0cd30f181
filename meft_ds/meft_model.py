"""`MeftModel`: a base model with meft adapters, saved and loaded the way PEFT's ``PeftModel`` is.

    model = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M")
    model = meft_ds.MeftModel.from_pretrained(model, "outputs/meft-facts")   # injects the adapters and loads them
    model.generate(**inputs)                                                  # the base model's methods, adapted
    model.save_pretrained("my-adapter")                                       # the adapter only (meft_ds.export)

Why a wrapper and not a new model class: the adapters live inside the base model (hooks on its FFNs), so the base
model object itself is the adapted model; ``MeftModel`` only adds ``from_pretrained`` / ``save_pretrained`` with
PEFT's call shapes. Everything else (``forward``, ``generate``, ``config``, ``device``, ...) is the base model's, and
``get_base_model()`` hands back that object, adapters in place, for code that wants the plain Hugging Face model
(``meft_ds.initialize``, ``MeftTrainer``, ``meft_ds.load_adapter`` also take it as it is).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from torch import nn

from meft_ds.config import MeftConfig, MeftConfigError
from meft_ds.export import DEFAULT_MAX_SHARD_SIZE, BaseModelWrapper, save_adapter, save_peft_adapters
from meft_ds.export_load import load_with_peft
from meft_ds.inject import adapters, disable_adapters, inject, trainable_numel


class MeftModel(BaseModelWrapper):
    """``MeftModel(base_model)`` wraps a model that has adapters (:func:`meft_ds.inject`); ``MeftModel(base_model,
    meft)`` injects them first with the settings ``meft`` (a dict or :class:`meft_ds.MeftConfig`). Attributes the
    wrapper does not have are the base model's."""

    def __init__(self, base_model: nn.Module, meft: MeftConfig | dict | None = None) -> None:
        super().__init__()
        if meft is not None or not adapters(base_model):
            inject(base_model, meft)
        self.base_model = base_model

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, path: str | os.PathLike) -> MeftModel:
        """``base_model`` with the exported adapter at ``path`` (checked against the model first: architecture,
        hidden size, depth, and the settings of adapters it already has), and with the PEFT adapters saved beside it
        in ``<path>/peft`` if any (e.g. LoRA: :meth:`save_pretrained` of a PEFT model, ``MeftTrainer.save_model``);
        ``get_base_model()`` is then PEFT's model."""
        return cls(load_with_peft(base_model, path))

    def save_pretrained(
        self,
        path: str | os.PathLike,
        *,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
        is_main_process: bool | None = None,
    ) -> Path:
        """The adapter in PEFT's layout (see :func:`meft_ds.save_adapter`; every rank calls it for sharded stores),
        and a PEFT model's own adapters (LoRA beside MEFT) in ``<path>/peft``."""
        directory = save_adapter(self.base_model, path, max_shard_size=max_shard_size, is_main_process=is_main_process)
        save_peft_adapters(self.base_model, directory, is_main_process=is_main_process)
        return directory

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` values, as PEFT's. Trainable: the adapters' rows (keys and values, held in the row
        stores rather than in parameters; each step fetches and updates only the rows its tokens select) and the
        parameters that require gradients (the routers); all: those and the frozen parameters."""
        trainable = trainable_numel(self.base_model)
        frozen = sum(p.numel() for p in self.base_model.parameters() if not p.requires_grad)
        return trainable, trainable + frozen

    def print_trainable_parameters(self) -> None:
        """PEFT's line: ``trainable params: ... || all params: ... || trainable%: ...``."""
        trainable, total = self.get_nb_trainable_parameters()
        share = 100 * trainable / total
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")

    def disable_adapter(self) -> contextlib.AbstractContextManager:
        """``with model.disable_adapter():`` the base model's outputs (:func:`meft_ds.disable_adapters`), as PEFT's."""
        return disable_adapters(self.base_model)

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        """Refused, with the way to serve: PEFT folds LoRA's ``B @ A`` into the base weights, but a MEFT adapter's
        output is a sum over the rows each token's router picks (top-K of thousands), which no fixed weight holds."""
        raise MeftConfigError(
            "merge_and_unload: a MEFT adapter cannot be merged into the base model's weights (each token adds the "
            "top-K rows its router picks, not a fixed matrix). Fix: serve the MeftModel as it is, with "
            "meft_ds.for_inference(model) to route on the device."
        )

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model.generate(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules (base_model)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)
