"""Files: the row stores inside a training checkpoint, and exported adapters for inference.

Every directory is written atomically: into a temporary sibling first, flushed to disk, then renamed into place,
so a process killed mid-write leaves the previous version intact and never a half-written one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from meft_ds.adapter import SparseKeyExpertAdapter
from meft_ds.config import MeftConfig
from meft_ds.inject import adapters, inject
from meft_ds.sparse_adam import SparseRowAdam

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
STORE_OPTIMIZER = "optimizer.json"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint or exported adapter is missing, incomplete, or does not match the model."""


def _fsync_dir(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(path: Path) -> None:
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    for directory in [path, *sorted(p for p in path.rglob("*") if p.is_dir())]:
        _fsync_dir(directory)


def publish_directory(staging: Path, final: Path) -> None:
    """Flush ``staging`` to disk and rename it to ``final``, replacing an older ``final`` only after the new one is
    complete: at every instant one complete version exists under ``final`` or ``final.old``."""
    _fsync_tree(staging)
    previous = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(final, previous)
    os.replace(staging, final)
    _fsync_dir(final.parent)
    shutil.rmtree(previous, ignore_errors=True)


def recover_directory(final: Path) -> None:
    """Finish a :func:`publish_directory` that was killed between its two renames (``final`` gone, ``final.old``
    complete): the previous version goes back in place."""
    previous = final.with_name(final.name + ".old")
    if not final.exists() and previous.is_dir():
        os.replace(previous, final)


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_directory(path) as tmp:`` write files into ``tmp``; on success it becomes ``path``."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish_directory(staging, final)


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_file(path) as tmp:`` write ``tmp``; on success it is flushed and renamed to ``path``."""
    final = Path(final)
    temporary = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        yield temporary
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, final)
        _fsync_dir(final.parent)
    finally:
        temporary.unlink(missing_ok=True)


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    with atomic_file(path) as temporary:
        temporary.write_text(json.dumps(payload, indent=2))


# --------------------------------------------------------------------------- row stores (training checkpoints)
def save_stores(directory: Path, model_adapters: list[SparseKeyExpertAdapter], optimizer: SparseRowAdam) -> None:
    """Rows and Adam moments of every adapter (one safetensors file per layer) and the sparse optimizer's state."""
    directory.mkdir(parents=True, exist_ok=True)
    for adapter in model_adapters:
        store = adapter.store
        tensors = {"rows": store.rows, "exp_avg": store.exp_avg, "exp_avg_sq": store.exp_avg_sq}
        save_file(tensors, str(directory / f"layer_{adapter.layer_index}.safetensors"))
    state = optimizer.state_dict()
    payload = {"global_step": state["global_step"], "param_groups": state["param_groups"]}
    (directory / STORE_OPTIMIZER).write_text(json.dumps(payload, indent=2))


def load_stores(directory: Path, model_adapters: list[SparseKeyExpertAdapter], optimizer: SparseRowAdam) -> None:
    """Restore what :func:`save_stores` wrote; every mismatch is a :class:`CheckpointError` before any copy."""
    loaded = {}
    for adapter in model_adapters:
        file = directory / f"layer_{adapter.layer_index}.safetensors"
        if not file.exists():
            raise CheckpointError(
                f"{file}: the checkpoint has no row store for layer {adapter.layer_index}. Fix: resume with the same "
                "meft.layers as the run that wrote it, or start a new run."
            )
        tensors = load_file(str(file))
        expected = tuple(adapter.store.rows.shape)
        if tuple(tensors["rows"].shape) != expected:
            raise CheckpointError(
                f"{file}: rows have shape {tuple(tensors['rows'].shape)} but this model's layer "
                f"{adapter.layer_index} expects {expected} (num_neurons, 2, hidden size). Fix: resume with the "
                "meft settings and model of the run that wrote the checkpoint."
            )
        loaded[adapter.layer_index] = tensors
    state = json.loads((directory / STORE_OPTIMIZER).read_text())
    for adapter in model_adapters:
        tensors = loaded[adapter.layer_index]
        adapter.store.rows.copy_(tensors["rows"])
        adapter.store.exp_avg.copy_(tensors["exp_avg"])
        adapter.store.exp_avg_sq.copy_(tensors["exp_avg_sq"])
        adapter.drop_row_grads()
        adapter.rows_changed()
    optimizer.load_state_dict({"state": {}, **state})


# --------------------------------------------------------------------------- exported adapters (inference)
def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Export the trained adapters (keys, values, routers) as safetensors plus a JSON config into ``directory``.

    The export holds no optimizer state; :func:`load_adapter` loads it into a fresh base model for inference.
    """
    model_adapters = adapters(model)
    if not model_adapters:
        raise CheckpointError("save_adapter: the model has no meft adapters. Fix: call meft_ds.inject(model) first.")
    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    for adapter in model_adapters:
        prefix = f"layers.{adapter.layer_index}"
        tensors[f"{prefix}.keys"] = adapter.store.keys.contiguous()
        tensors[f"{prefix}.values"] = adapter.store.values.contiguous()
        tensors[f"{prefix}.router"] = adapter.router.weight.detach().float().cpu().contiguous()
    config = model_adapters[0].config
    meta = {
        "format_version": FORMAT_VERSION,
        "model_type": getattr(model.config, "model_type", None),
        "hidden_size": model_adapters[0].dim,
        "layers": [a.layer_index for a in model_adapters],
        "meft": {**config.to_dict(), "layers": [a.layer_index for a in model_adapters]},
    }
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_file(directory / ADAPTER_WEIGHTS) as temporary:
        save_file(tensors, str(temporary))
    write_json_atomic(directory / ADAPTER_CONFIG, meta)  # last: a config always describes complete weights
    return directory


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    directory = Path(directory)
    config_file = directory / ADAPTER_CONFIG
    if not config_file.exists() or not (directory / ADAPTER_WEIGHTS).exists():
        raise CheckpointError(
            f"{directory}: no exported meft adapter here (expected {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}). Fix: "
            "point at the --output_dir of a finished run, or a folder written by meft_ds.save_adapter."
        )
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_file}: not valid JSON ({error}). Fix: re-export the adapter.") from error


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load an exported adapter into ``model`` (injecting adapters with the saved settings if it has none)."""
    meta = read_adapter_config(directory)
    config = MeftConfig.from_dict(meta["meft"])
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if meta["hidden_size"] != hidden:
        raise CheckpointError(
            f"{directory}: the adapter was trained for hidden size {meta['hidden_size']} ({meta['model_type']}), "
            f"this model has {hidden} ({model_type}). Fix: load it into the base model it was trained on."
        )
    if not adapters(model):
        inject(model, config)
    model_adapters = adapters(model)
    present = [a.layer_index for a in model_adapters]
    if present != meta["layers"]:
        raise CheckpointError(
            f"{directory}: the adapter covers layers {meta['layers']}, the model's adapters sit on {present}. Fix: "
            "load into a model without adapters (they are injected from the saved settings) or with the same layers."
        )
    tensors = load_file(str(Path(directory) / ADAPTER_WEIGHTS))
    for adapter in model_adapters:
        prefix = f"layers.{adapter.layer_index}"
        for name, target in (("keys", adapter.store.keys), ("values", adapter.store.values)):
            source = tensors[f"{prefix}.{name}"]
            if source.shape != target.shape or source.dtype != target.dtype:
                raise CheckpointError(
                    f"{directory}: {prefix}.{name} is {tuple(source.shape)} {source.dtype}, the model's adapter "
                    f"expects {tuple(target.shape)} {target.dtype}. Fix: use the meft settings it was trained with."
                )
            target.copy_(source)
        with torch.no_grad():
            adapter.router.weight.copy_(tensors[f"{prefix}.router"])
        adapter.rows_changed()
    return model
