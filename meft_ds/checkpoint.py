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
from meft_ds.store import CheckpointError

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
STORE_OPTIMIZER = "optimizer.json"
FORMAT_VERSION = 1


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
def save_stores(
    directory: Path, model_adapters: list[SparseKeyExpertAdapter], optimizer: SparseRowAdam, *, rank: int = 0
) -> None:
    """Every adapter's rows and Adam moments (each store writes its files: a replicated store on rank 0 only, a
    sharded one on every rank) and, on rank 0, the sparse optimizer's state."""
    directory.mkdir(parents=True, exist_ok=True)
    for adapter in model_adapters:
        if rank == 0 or adapter.store.is_shard:
            adapter.store.save(directory, adapter.layer_index)
    if rank == 0:
        state = optimizer.state_dict()
        payload = {"global_step": state["global_step"], "param_groups": state["param_groups"]}
        (directory / STORE_OPTIMIZER).write_text(json.dumps(payload, indent=2))


def load_stores(directory: Path, model_adapters: list[SparseKeyExpertAdapter], optimizer: SparseRowAdam) -> None:
    """Restore what :func:`save_stores` wrote; every mismatch is a :class:`CheckpointError` before any copy."""
    for adapter in model_adapters:
        adapter.store.check_saved(directory, adapter.layer_index)
    state = json.loads((directory / STORE_OPTIMIZER).read_text())
    for adapter in model_adapters:
        adapter.store.load(directory, adapter.layer_index)
        adapter.drop_row_grads()
        adapter.rows_changed()
    optimizer.load_state_dict({"state": {}, **state})


# --------------------------------------------------------------------------- exported adapters (inference)
def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Export the trained adapters (keys, values, routers) as safetensors plus a JSON config into ``directory``.

    The export holds no optimizer state; :func:`load_adapter` loads it into a fresh base model for inference.
    With sharded stores every rank must call it (the rows are gathered); rank 0 writes.
    """
    model_adapters = adapters(model)
    if not model_adapters:
        raise CheckpointError("save_adapter: the model has no meft adapters. Fix: call meft_ds.inject(model) first.")
    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    for adapter in model_adapters:
        prefix = f"layers.{adapter.layer_index}"
        rows = adapter.store.full_rows()
        tensors[f"{prefix}.keys"] = rows[:, 0].contiguous()
        tensors[f"{prefix}.values"] = rows[:, 1].contiguous()
        tensors[f"{prefix}.router"] = adapter.router.weight.detach().float().cpu().contiguous()
    config = model_adapters[0].config
    meta = {
        "format_version": FORMAT_VERSION,
        "model_type": getattr(model.config, "model_type", None),
        "hidden_size": model_adapters[0].dim,
        "layers": [a.layer_index for a in model_adapters],
        "meft": {**config.to_dict(), "layers": [a.layer_index for a in model_adapters]},
    }
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return directory  # every rank helps gather sharded rows; rank 0 writes
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
    config = MeftConfig.from_dict({**meta["meft"], "store": None})  # inference: a plain in-memory store
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
    for adapter in model_adapters:  # check everything before changing anything
        for name in ("keys", "values"):
            source, expected = tensors[f"layers.{adapter.layer_index}.{name}"], (adapter.store.num_rows, adapter.dim)
            if tuple(source.shape) != expected or source.dtype != torch.float32:
                raise CheckpointError(
                    f"{directory}: layers.{adapter.layer_index}.{name} is {tuple(source.shape)} {source.dtype}, the "
                    f"model's adapter expects {expected} torch.float32. Fix: use the meft settings it was trained with."
                )
    for adapter in model_adapters:
        prefix = f"layers.{adapter.layer_index}"
        adapter.store.assign_rows(torch.stack([tensors[f"{prefix}.keys"], tensors[f"{prefix}.values"]], dim=1))
        with torch.no_grad():
            adapter.router.weight.copy_(tensors[f"{prefix}.router"])
        adapter.rows_changed()
    return model
