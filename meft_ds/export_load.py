"""Loading exported adapters (:mod:`meft_ds.export` describes the format): every check runs before anything changes.

A folder is refused, with the field and the fix, when it holds no export or a broken one, when the model is another
architecture, hidden size or depth than the adapter was trained on, or when the model already has adapters on other
layers or with other settings. Both formats load: this version's (PEFT's layout, ``adapter_model.safetensors``,
sharded or not) and meft_ds 0.1's (``adapter.safetensors`` with ``layers.<i>.{keys,values,router}``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from meft_ds.adapter import SparseKeyExpertAdapter
from meft_ds.config import MeftConfig, MeftConfigError
from meft_ds.export import (
    ADAPTER_CONFIG,
    EXPORT_KEYS,
    FORMAT_VERSION,
    LEGACY_WEIGHTS,
    PEFT_FOLDER,
    PEFT_TYPE,
    WEIGHTS,
    WEIGHTS_INDEX,
    library_version,
    tensor_names,
    unwrap,
)
from meft_ds.inject import adapters, follow_peft_disable, holds_peft_layers, inject, text_config
from meft_ds.models import is_builtin_model, names_builtin_model
from meft_ds.store import CheckpointError

# the settings that decide what an adapter computes: a model that already has adapters must agree on them
FUNCTIONAL_SETTINGS = ("num_neurons", "num_experts", "top_k", "n_probe", "gate")
logger = logging.getLogger("meft_ds")


@dataclass(frozen=True)
class AdapterExport:
    """What an export folder holds, whichever format wrote it (read by :func:`read_export`)."""

    directory: Path
    config: dict[str, Any]  # adapter_config.json as written
    settings: MeftConfig  # the meft settings, with an in-memory store
    model_type: str | None
    hidden_size: int
    num_hidden_layers: int | None  # None in format 1
    base_model_name_or_path: str | None
    names: dict[int, dict[str, str]]  # layer index -> {"keys", "values", "router"} -> tensor name
    files: dict[str, Path]  # tensor name -> the file holding it
    export_id: str | None  # None in format 1


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    """``adapter_config.json`` of an export, as written (any format); a clear error if ``directory`` holds none."""
    directory = Path(directory)
    config_file = directory / ADAPTER_CONFIG
    weights = (WEIGHTS, WEIGHTS_INDEX, LEGACY_WEIGHTS)
    if not config_file.is_file() or not any((directory / file).is_file() for file in weights):
        raise CheckpointError(
            f"{directory}: no exported meft adapter here (expected {ADAPTER_CONFIG} and {WEIGHTS}, or "
            f"{WEIGHTS_INDEX} and its files). Fix: point at the --output_dir of a finished run, or a folder written by "
            "meft_ds.save_adapter, MeftModel.save_pretrained or MeftTrainer.save_model."
        )
    config = _read_json(config_file)
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file}: expected a JSON object. Fix: re-export the adapter.")
    return config


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{file}: not valid JSON ({error}). Fix: re-export the adapter.") from error


def _field(config: dict[str, Any], key: str, config_file: Path) -> Any:
    if key not in config:
        raise CheckpointError(f"{config_file}: {key!r} is missing. Fix: re-export the adapter with meft_ds.")
    return config[key]


def read_export(directory: str | os.PathLike) -> AdapterExport:
    """Parse and check an export folder's config and find its weight files (nothing is loaded)."""
    directory = Path(directory)
    config = read_adapter_config(directory)
    config_file = directory / ADAPTER_CONFIG
    version = config.get("format_version")
    if config.get("peft_type") == PEFT_TYPE:
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointError(
                f"{config_file}: format_version {version!r}, written by meft_ds {config.get('meft_ds_version')}; this "
                f"meft_ds ({library_version()}) reads formats up to {FORMAT_VERSION}. Fix: upgrade meft_ds."
            )
        settings = {key: value for key, value in config.items() if key not in EXPORT_KEYS}
        layers, modules = _field(config, "layers", config_file), _field(config, "target_modules", config_file)
        if not isinstance(layers, list) or not isinstance(modules, list) or len(layers) != len(modules):
            raise CheckpointError(f"{config_file}: 'layers' and 'target_modules' disagree. Fix: re-export the adapter.")
        names = {layer: tensor_names(module) for layer, module in zip(layers, modules, strict=True)}
        num_layers, export_id = _field(config, "num_hidden_layers", config_file), config.get("export_id")
    elif version == 1 and isinstance(config.get("meft"), dict):
        settings = config["meft"]
        layers = _field(config, "layers", config_file)
        names = {i: {part: f"layers.{i}.{part}" for part in ("keys", "values", "router")} for i in layers}
        num_layers, export_id = None, None
    else:
        raise CheckpointError(
            f"{config_file}: not a meft adapter (peft_type {config.get('peft_type')!r}). Fix: load other PEFT "
            "adapters with peft.PeftModel.from_pretrained; point meft_ds at a folder written by meft_ds.save_adapter."
        )
    try:
        meft = MeftConfig.from_dict({**settings, "store": {"shard": False}})  # inference: a plain in-memory store
    except MeftConfigError as error:
        raise CheckpointError(
            f"{config_file}: {error} (written by meft_ds {config.get('meft_ds_version', '0.1')}, read by "
            f"{library_version()}). Fix: use the meft_ds version that wrote it, or re-export the adapter."
        ) from error
    every_name = [name for parts in names.values() for name in parts.values()]
    return AdapterExport(
        directory=directory,
        config=config,
        settings=meft,
        model_type=config.get("model_type"),
        hidden_size=_field(config, "hidden_size", config_file),
        num_hidden_layers=num_layers,
        base_model_name_or_path=config.get("base_model_name_or_path"),
        names=names,
        files=_weight_files(directory, every_name, export_id, legacy=version == 1),
        export_id=export_id,
    )


def _weight_files(directory: Path, every_name: list[str], export_id: str | None, *, legacy: bool) -> dict[str, Path]:
    """Which file holds each tensor: the index's map when there is an index of this export, else the one file."""
    if legacy:
        return dict.fromkeys(every_name, directory / LEGACY_WEIGHTS)
    index_file, single = directory / WEIGHTS_INDEX, directory / WEIGHTS
    if index_file.is_file():
        index = _read_json(index_file)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_file}: no 'weight_map'. Fix: re-export the adapter.")
        if index.get("metadata", {}).get("export_id") == export_id or not single.is_file():
            return {name: directory / file for name, file in weight_map.items()}
    return dict.fromkeys(every_name, single)


def check_base_model(model_config: Any, export: AdapterExport) -> None:
    """Refuse a base model (its ``PretrainedConfig``) of another architecture, hidden size or depth than the adapter
    was trained on: before a model loads (``launch/train.py --adapter``) and before an adapter loads into one."""
    decoder = text_config(model_config)  # a multimodal model's text part
    model_type, hidden = getattr(model_config, "model_type", None), getattr(decoder, "hidden_size", None)
    depth = getattr(decoder, "num_hidden_layers", None)
    trained_on = export.base_model_name_or_path or "its base model"
    if export.model_type is not None and model_type != export.model_type:
        raise CheckpointError(
            f"{export.directory}: the adapter was trained on a {export.model_type!r} model ({trained_on}), this model "
            f"is {model_type!r}. Fix: load it into the base model it was trained on."
        )
    if export.hidden_size != hidden:
        raise CheckpointError(
            f"{export.directory}: the adapter was trained for hidden size {export.hidden_size} ({export.model_type}), "
            f"this model has {hidden} ({model_type}). Fix: load it into the base model it was trained on."
        )
    if export.num_hidden_layers is not None and depth is not None and depth != export.num_hidden_layers:
        raise CheckpointError(
            f"{export.directory}: the adapter was trained on a model with {export.num_hidden_layers} decoder layers "
            f"({trained_on}), this model has {depth}. Fix: load it into the base model it was trained on."
        )


def _warn_other_base(model: nn.Module, export: AdapterExport) -> None:
    """A base model of the same shape but another name than the adapter's: loaded, with a word."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    builtin = names_builtin_model(export.base_model_name_or_path) and is_builtin_model(model)  # loaded from its cache
    if export.base_model_name_or_path and name and name != export.base_model_name_or_path and not builtin:
        logger.warning(
            "meft_ds: %s was trained on %s; loading it into %s (same architecture and shape).",
            export.directory, export.base_model_name_or_path, name,
        )  # fmt: skip


def _check_adapters(model_adapters: list[SparseKeyExpertAdapter], export: AdapterExport) -> None:
    """A model that already has adapters must have them on the same layers, computing the same function."""
    present = [a.layer_index for a in model_adapters]
    if present != sorted(export.names):
        raise CheckpointError(
            f"{export.directory}: the adapter covers layers {sorted(export.names)}, the model's adapters sit on "
            f"{present}. Fix: load into a model without adapters (they are injected from the saved settings) or with "
            "the same layers."
        )
    for key in FUNCTIONAL_SETTINGS:
        saved, mine = getattr(export.settings, key), getattr(model_adapters[0].config, key)
        if saved != mine:
            raise CheckpointError(
                f"{export.directory}: meft.{key} is {saved!r} in the adapter, {mine!r} in this model's adapters. Fix: "
                "load into a model without adapters (they are injected from the saved settings), or inject with the "
                "adapter's settings."
            )


def _check_tensors(export: AdapterExport, handles: dict[Path, Any]) -> None:
    """Every tensor present, from this export, in the shape the saved settings give (read from the headers)."""
    rows, dim = export.settings.num_neurons, export.hidden_size
    expected = {"keys": (rows, dim), "values": (rows, dim), "router": (export.settings.num_experts, dim)}
    for file, handle in handles.items():
        found = (handle.metadata() or {}).get("export_id")
        if export.export_id is not None and found != export.export_id:
            raise CheckpointError(
                f"{file}: belongs to another export than {ADAPTER_CONFIG} (export id {found}, expected "
                f"{export.export_id}): a save was interrupted between its renames. Fix: export the adapter again."
            )
    stored = {file: set(handle.keys()) for file, handle in handles.items()}
    for parts in export.names.values():
        for part, name in parts.items():
            file = export.files.get(name)
            if file is None or name not in stored[file]:
                raise CheckpointError(f"{export.directory}: tensor {name} is missing. Fix: re-export the adapter.")
            shape = tuple(handles[file].get_slice(name).get_shape())
            if shape != expected[part]:
                raise CheckpointError(
                    f"{file}: {name} is {shape}, the adapter's settings (meft.num_neurons, meft.num_experts, hidden "
                    f"size) give {expected[part]}. Fix: re-export the adapter."
                )


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load an exported adapter into ``model`` (a base model, injected here with the saved settings, or one with
    adapters on the same layers and the same settings). Every check runs before anything changes; returns ``model``.
    Reads this module's format and meft_ds 0.1's. PEFT adapters saved beside it (``<directory>/peft``) are not
    loaded: :func:`load_with_peft` loads both."""
    _load_meft(model, directory)
    if (Path(directory) / PEFT_FOLDER).is_dir() and not holds_peft_layers(model):
        logger.warning(
            "meft_ds: %s also holds PEFT adapters (e.g. LoRA, saved beside MEFT's by MeftTrainer.save_model); "
            "load_adapter loads MEFT's only. Fix: meft_ds.MeftModel.from_pretrained(base_model, %r) loads both.",
            directory, str(directory),
        )  # fmt: skip
    return model


def load_with_peft(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """:func:`load_adapter`, then the PEFT adapters saved beside MEFT's (``<directory>/peft``, e.g. LoRA, as
    ``MeftTrainer.save_model`` and ``MeftModel.save_pretrained`` write them) with PEFT's ``PeftModel.from_pretrained``:
    returns that PEFT model, or ``model`` when the folder holds no PEFT adapters."""
    folder = Path(directory) / PEFT_FOLDER
    if not folder.is_dir():
        _load_meft(model, directory)
        return model
    try:
        from peft import PeftModel
    except ImportError:
        raise CheckpointError(
            f"{folder}: PEFT adapters (e.g. LoRA) saved beside MEFT's, and the peft package is not installed. Fix: "
            "pip install peft."
        ) from None
    _load_meft(model, directory)
    peft_model = PeftModel.from_pretrained(model, str(folder))
    follow_peft_disable(peft_model)
    return peft_model


def _load_meft(model: nn.Module, directory: str | os.PathLike) -> None:
    export = read_export(directory)
    target = unwrap(model)
    check_base_model(getattr(target, "config", None), export)
    _warn_other_base(target, export)
    if adapters(target):
        _check_adapters(adapters(target), export)
    with contextlib.ExitStack() as stack:
        for file in set(export.files.values()):
            if not file.is_file():
                raise CheckpointError(f"{file}: missing (named by {WEIGHTS_INDEX}). Fix: re-export the adapter.")
        handles = {f: stack.enter_context(safe_open(str(f), framework="pt")) for f in set(export.files.values())}
        _check_tensors(export, handles)
        if not adapters(target):
            inject(target, export.settings)
        for adapter in adapters(target):
            names = export.names[adapter.layer_index]
            tensors = {part: handles[export.files[name]].get_tensor(name).float() for part, name in names.items()}
            adapter.store.assign_rows(torch.stack([tensors["keys"], tensors["values"]], dim=1))
            with torch.no_grad():
                adapter.router.weight.copy_(tensors["router"])
            adapter.rows_changed()
