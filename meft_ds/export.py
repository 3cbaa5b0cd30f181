"""Exported adapters: what a trained model needs for inference, laid out as PEFT lays out its adapters.

    my-adapter/
      adapter_config.json        {"peft_type": "MEFT", "base_model_name_or_path": ..., the meft settings, ...}
      adapter_model.safetensors  fp32 tensors, named as PEFT names its adapters' tensors:
        base_model.model.<ffn>.meft_adapter.keys            (num_neurons, hidden_size)
        base_model.model.<ffn>.meft_adapter.values          (num_neurons, hidden_size)
        base_model.model.<ffn>.meft_adapter.router.weight   (num_experts, hidden_size)
      <ffn>: the FFN module the adapter sits beside, e.g. model.layers.3.mlp (LLaMA), transformer.h.3.mlp (GPT-2)

Past ``max_shard_size`` (5 GB by default) the tensors are split, as transformers splits checkpoints, into
``adapter_model-00001-of-0000N.safetensors`` files and ``adapter_model.safetensors.index.json``
(``{"metadata": {"total_size": ...}, "weight_map": {tensor name: file}}``).

A save is atomic: every file is written complete into a staging folder beside the export and flushed to disk, then
renamed into place, ``adapter_config.json`` last. A process killed before the renames leaves the previous export
whole; the renames take microseconds, and should a kill land between two of them, the files' export ids (in the
config, the index and every weights file) disagree and loading says so instead of mixing two exports. The format
written by meft_ds 0.1 (``adapter.safetensors`` with ``layers.<i>.{keys,values,router}``) still loads
(:mod:`meft_ds.export_load`).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import re
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed
from safetensors.torch import save_file
from torch import nn

from meft_ds.adapter import SparseKeyExpertAdapter
from meft_ds.checkpoint import gathered
from meft_ds.files import fsync_dir, fsync_tree
from meft_ds.inject import (
    adapters,
    decoder_layers,
    holds_peft_layers,
    locate_ffns,
    register_adapter_saver,
    without_peft_wrapper,
)
from meft_ds.store import CheckpointError

FORMAT_VERSION = 2
PEFT_FOLDER = "peft"  # a PEFT model's own adapters (e.g. LoRA beside MEFT), saved into <export>/peft
PEFT_TYPE = "MEFT"
ADAPTER_CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
WEIGHTS_INDEX = "adapter_model.safetensors.index.json"
LEGACY_WEIGHTS = "adapter.safetensors"  # format 1 (meft_ds 0.1's save_adapter)
DEFAULT_MAX_SHARD_SIZE = "5GB"
STAGING_PREFIX = ".meft-export.tmp-"
_OURS = re.compile(r"adapter_model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?|adapter\.safetensors")
# the keys of adapter_config.json that describe the export; every other key is a meft setting (MeftConfig field)
EXPORT_KEYS = (
    "peft_type", "task_type", "base_model_name_or_path", "inference_mode", "meft_ds_version", "format_version",
    "export_id", "model_type", "hidden_size", "num_hidden_layers", "target_modules",
)  # fmt: skip
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
logger = logging.getLogger("meft_ds")


def library_version() -> str:
    try:
        return importlib.metadata.version("meft_ds")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like ``"5GB"`` (10**9, as transformers reads it) or ``"500MiB"`` (2**20)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", size) if isinstance(size, str) else None
    unit = match.group(2).upper() if match else None
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    elif match and unit in _UNITS:
        value = int(float(match.group(1)) * _UNITS[unit])
    else:
        value = 0
    if value < 1:
        raise ValueError(
            f"max_shard_size: {size!r} is not a size. Fix: pass a positive number of bytes or a string such as "
            "'5GB' or '500MiB'."
        )
    return value


def shard_file_name(index: int, count: int) -> str:
    return f"adapter_model-{index:05d}-of-{count:05d}.safetensors"


def tensor_names(ffn_path: str) -> dict[str, str]:
    """The names of an adapter's tensors in ``adapter_model.safetensors``, PEFT-style (see the module docstring)."""
    stem = f"base_model.model.{ffn_path}.meft_adapter"
    return {"keys": f"{stem}.keys", "values": f"{stem}.values", "router": f"{stem}.router.weight"}


class BaseModelWrapper(nn.Module):
    """A module that holds the adapted model as ``base_model`` (:class:`meft_ds.MeftModel`): :func:`unwrap` sees
    through it. Defined here, not in :mod:`meft_ds.meft_model`, because that module imports this one."""

    base_model: nn.Module


def without_meft_wrapper(model: Any) -> Any:
    """The model a :class:`meft_ds.MeftModel` wraps (the adapted model itself), else ``model``. The entry points
    that train take a ``MeftModel`` as that model: a trainer keeps the dataset columns the model's ``forward`` names
    (the wrapper's names none), and the wrapper would put ``base_model.`` before every parameter name a checkpoint
    records."""
    return model.base_model if isinstance(model, BaseModelWrapper) else model


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a :class:`meft_ds.MeftModel`, a DeepSpeed engine, a DDP wrapper or a PEFT
    model."""
    while True:
        if (inner := without_meft_wrapper(model)) is not model:
            model = inner
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        elif (inner := without_peft_wrapper(model)) is not model:
            model = inner
        else:
            return model


def _router_weight(adapter: SparseKeyExpertAdapter) -> torch.Tensor:
    """The router's weight in fp32 on the CPU. Under ZeRO-3 it is partitioned: gathered, every rank taking part."""
    weight = adapter.router.weight
    with gathered(weight):
        return weight.detach().float().cpu().clone()


# --------------------------------------------------------------------------- saving
def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    base_model_name_or_path: str | None = None,
    is_main_process: bool | None = None,
) -> Path:
    """Export the trained adapters (keys, values, routers; no optimizer state) into ``directory``, in PEFT's layout.

    :func:`load_adapter` (or :meth:`meft_ds.MeftModel.from_pretrained`) loads it into a fresh base model. Other
    files in ``directory`` are left alone; an earlier export there is replaced atomically.

    Args:
        max_shard_size: split the weights into files of at most this size (bytes, or e.g. ``"5GB"``); a tensor larger
            than that gets a file of its own.
        base_model_name_or_path: recorded in ``adapter_config.json``; default: the model's ``name_or_path``.
        is_main_process: whether this process writes (default: rank 0, or the only process). Every rank must call
            this when the stores are sharded (``meft.store.shard``: the rows are gathered from every rank) or the
            model is partitioned by ZeRO-3 (the routers are gathered); with replicated stores rank 0 alone may.
    """
    model = unwrap(model)
    model_adapters = adapters(model)
    if not model_adapters:
        raise CheckpointError("save_adapter: the model has no meft adapters. Fix: call meft_ds.inject(model) first.")
    is_main_process = _writes(is_main_process)
    directory = Path(directory)
    location = locate_ffns(model)
    ffn_paths = {a.layer_index: f"{location.layers_path}.{a.layer_index}.{location.ffn_attr}" for a in model_adapters}
    shards = _plan_shards(model_adapters, ffn_paths, parse_size(max_shard_size))
    export_id = uuid.uuid4().hex
    depth = len(decoder_layers(model, location))
    config = _export_config(model, model_adapters, ffn_paths, depth, base_model_name_or_path, export_id)
    staging = directory / f"{STAGING_PREFIX}{socket.gethostname()}-{os.getpid()}"
    if not is_main_process:
        _write_shards(model_adapters, ffn_paths, shards, staging, export_id, write=False)  # the gathers only
        return directory
    if unsaved := _trained_outside_the_export(model):
        logger.warning(
            "meft_ds: the model also trains %s, which the meft adapter's export does not hold. Fix: save them beside "
            "it yourself, or train them through PEFT beside MEFT (e.g. LoraConfig(task_type='SEQ_CLS') keeps a "
            "classification head trainable, modules_to_save=[...] others), whose part is saved in %s/%s.",
            ", ".join(unsaved), directory, PEFT_FOLDER,
        )  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    _remove_dead_staging(directory)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        files = _write_shards(model_adapters, ffn_paths, shards, staging, export_id, write=True)
        published = list(files)
        if len(files) > 1:
            weight_map = {name: file for file, names in files.items() for name in names}
            total = sum(size for shard in shards for _, size in shard)
            index = {"metadata": {"total_size": total, "export_id": export_id}, "weight_map": weight_map}
            (staging / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2))
            published.append(WEIGHTS_INDEX)
        (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
        published.append(ADAPTER_CONFIG)  # last: a config always describes complete weights
        fsync_tree(staging)
        for name in published:
            os.replace(staging / name, directory / name)
        fsync_dir(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for path in directory.iterdir():  # an earlier export's files that the new one does not use
        if path.name not in published and _OURS.fullmatch(path.name):
            path.unlink(missing_ok=True)
    return directory


register_adapter_saver(save_adapter)  # model.save_pretrained of a model with adapters writes the adapter


def _trained_outside_the_export(model: nn.Module) -> list[str]:
    """The names of ``model``'s trainable parameters besides the routers (e.g. a classification head unfrozen after
    :func:`meft_ds.inject`): an export holds the adapters only. None where PEFT trains layers in ``model``: PEFT
    saves what it trains (:func:`save_peft_adapters`)."""
    if holds_peft_layers(model):
        return []
    routers = {id(adapter.router.weight) for adapter in adapters(model)}
    return [name for name, param in model.named_parameters() if param.requires_grad and id(param) not in routers]


def _remove_dead_staging(directory: Path) -> None:
    """Remove the staging folders that processes of this host left when killed mid-export (their pid is gone);
    another process's export in progress, or another host's, is left alone."""
    host = socket.gethostname()
    for staging in directory.glob(f"{STAGING_PREFIX}{host}-*"):
        pid = staging.name.removeprefix(f"{STAGING_PREFIX}{host}-")
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(staging, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's


def save_peft_adapters(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    is_main_process: bool | None = None,
    state_dict: dict | None = None,
) -> None:
    """A PEFT model's own adapters (e.g. LoRA beside MEFT) into ``<directory>/peft``, written by PEFT's
    ``save_pretrained`` (its file names are those of MEFT's export, hence a folder of their own); nothing when
    ``model`` is not a PEFT model. ``is_main_process`` as in :func:`save_adapter`; ``state_dict``: the weights
    gathered where ZeRO-3 partitions them."""
    if without_peft_wrapper(model) is not model and _writes(is_main_process):
        model.save_pretrained(os.path.join(directory, PEFT_FOLDER), state_dict=state_dict)


def _writes(is_main_process: bool | None) -> bool:
    """Whether this process writes an export: as given, else rank 0 or the only process."""
    if is_main_process is not None:
        return is_main_process
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _plan_shards(
    model_adapters: list[SparseKeyExpertAdapter], ffn_paths: dict[int, str], limit: int
) -> list[list[tuple[str, int]]]:
    """The tensors' ``(name, bytes)`` in order, cut into consecutive files of at most ``limit`` bytes."""
    shards: list[list[tuple[str, int]]] = [[]]
    used = 0
    for adapter in model_adapters:
        names = tensor_names(ffn_paths[adapter.layer_index])
        rows = adapter.store.num_rows * adapter.dim * 4  # fp32
        router = adapter.config.num_experts * adapter.dim * 4  # (a ZeRO-3 partitioned weight has no numel here)
        for name, size in ((names["keys"], rows), (names["values"], rows), (names["router"], router)):
            if shards[-1] and used + size > limit:
                shards.append([])
                used = 0
            shards[-1].append((name, size))
            used += size
    return shards


def _write_shards(
    model_adapters: list[SparseKeyExpertAdapter],
    ffn_paths: dict[int, str],
    shards: list[list[tuple[str, int]]],
    staging: Path,
    export_id: str,
    *,
    write: bool,
) -> dict[str, list[str]]:
    """Gather each layer's tensors (every rank: the collectives of sharded stores and ZeRO-3) and, where ``write``,
    save each file as soon as its tensors are in: at most one file and one layer in memory at a time."""
    files = {(WEIGHTS if len(shards) == 1 else shard_file_name(i + 1, len(shards))): s for i, s in enumerate(shards)}
    pending = iter(files.items())
    file, members = next(pending)
    ready: dict[str, torch.Tensor] = {}
    for adapter in model_adapters:
        router = _router_weight(adapter)
        rows = adapter.store.full_rows() if write or adapter.store.is_shard else None
        if not write:
            continue
        names = tensor_names(ffn_paths[adapter.layer_index])
        ready[names["keys"]] = rows[:, 0].contiguous()
        ready[names["values"]] = rows[:, 1].contiguous()
        ready[names["router"]] = router.contiguous()
        del rows
        while file is not None and all(name in ready for name, _ in members):
            tensors = {name: ready.pop(name) for name, _ in members}
            save_file(tensors, str(staging / file), metadata=_metadata(export_id))
            file, members = next(pending, (None, []))
    return {name: [tensor for tensor, _ in members] for name, members in files.items()}


def _metadata(export_id: str) -> dict[str, str]:
    return {"format": "pt", "export_id": export_id, "format_version": str(FORMAT_VERSION)}


def _export_config(
    model: nn.Module,
    model_adapters: list[SparseKeyExpertAdapter],
    ffn_paths: dict[int, str],
    depth: int,
    base_model_name_or_path: str | None,
    export_id: str,
) -> dict[str, Any]:
    settings = model_adapters[0].config.to_dict()
    settings["layers"] = [a.layer_index for a in model_adapters]
    del settings["store"]  # where the rows lived in training (paths of that machine); inference keeps them in memory
    model_config = getattr(model, "config", None)
    name = base_model_name_or_path or getattr(model_config, "_name_or_path", None) or None
    return {
        "peft_type": PEFT_TYPE,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": name,
        "inference_mode": True,
        "meft_ds_version": library_version(),
        "format_version": FORMAT_VERSION,
        "export_id": export_id,
        "model_type": getattr(model_config, "model_type", None),
        "hidden_size": model_adapters[0].dim,
        "num_hidden_layers": depth,
        "target_modules": [ffn_paths[a.layer_index] for a in model_adapters],
        **settings,
    }
