"""What meft_ds adds to a training checkpoint: the row stores, and a sample of the frozen base model that the run
must resume on (atomic files: :mod:`meft_ds.files`; exported adapters: :mod:`meft_ds.export`).
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from meft_ds.adapter import SparseKeyExpertAdapter
from meft_ds.sparse_adam import SparseRowAdam
from meft_ds.store import CheckpointError

STORE_DIR = "meft"  # in a checkpoint's tag folder, beside DeepSpeed's files
UNIVERSAL_SUFFIX = "_universal"  # a universal checkpoint's tag: its source's, with this (meft_ds.universal)
UNIVERSAL_POINTER = "latest_universal"  # DeepSpeed's pointer to the universal checkpoint to load
STORE_OPTIMIZER = "optimizer.json"
STORE_SETTINGS = "meft_settings.json"  # the adapters' settings (since 2026-12-06; older checkpoints lack it)
PARTITIONED_STATE = "*zero_pp_rank_*_mp_rank_00_optim_states.pt"  # ZeRO's optimizer state, a file per saving rank
SHAPED_SETTINGS = ("num_neurons", "num_experts")  # they give the rows' and the routers' shapes
BASE_SAMPLE = "base_model_sample.pt"
SAMPLES_PER_TENSOR = 64


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
        state = optimizer.state_dict(with_rows=False)  # the stores wrote theirs above
        payload = {"global_step": state["global_step"], "param_groups": state["param_groups"]}
        (directory / STORE_OPTIMIZER).write_text(json.dumps(payload, indent=2))
        settings = model_adapters[0].config.to_dict() | {"layers": [a.layer_index for a in model_adapters]}
        (directory / STORE_SETTINGS).write_text(json.dumps(settings, indent=2))


def check_stores(directory: Path, model_adapters: list[SparseKeyExpertAdapter]) -> None:
    """A :class:`meft_ds.store.CheckpointError` naming the setting unless the checkpoint in ``directory`` fits the
    model's adapters: the same rows and router shapes, a store file for every layer. Called before anything of the
    checkpoint loads (DeepSpeed's own load would otherwise fail on a router's shape first, without the fix)."""
    settings_file = directory / STORE_SETTINGS
    if settings_file.is_file():
        saved, config = json.loads(settings_file.read_text()), model_adapters[0].config
        for key in SHAPED_SETTINGS:
            if saved.get(key) != getattr(config, key):
                raise CheckpointError(
                    f"{directory.parent}: meft.{key} is {saved.get(key)} in the checkpoint, {getattr(config, key)} in "
                    "this run. Fix: resume with the meft settings of the run that wrote the checkpoint."
                )
    for adapter in model_adapters:
        adapter.store.check_saved(directory, adapter.layer_index)


def load_stores(directory: Path, model_adapters: list[SparseKeyExpertAdapter], optimizer: SparseRowAdam) -> None:
    """Restore what :func:`save_stores` wrote, once :func:`check_stores` has passed."""
    state = json.loads((directory / STORE_OPTIMIZER).read_text())
    for adapter in model_adapters:
        adapter.store.load(directory, adapter.layer_index)
        adapter.drop_row_grads()
        adapter.rows_changed()
    optimizer.load_state_dict({"state": {}, **state})


# --------------------------------------------------------------------------- which checkpoint, and whether it fits
def tag_to_load(load_dir: Path, tag: Any, *, universal: bool) -> str | None:
    """The checkpoint ``load_checkpoint(load_dir, tag)`` loads. Without a tag, DeepSpeed's: the one ``latest`` names,
    or under ``"checkpoint": {"load_universal": true}`` the one ``latest_universal`` names. Under ``load_universal``,
    a tag that is not a universal checkpoint stands for its conversion, ``<tag>_universal`` (Accelerate's
    ``load_state`` names its tag, ``pytorch_model``, itself). A :class:`CheckpointError` where the universal checkpoint
    is older than ``latest`` (a run resumed from one and saved again, the setting left on: every restart would go back
    to it), or a partitioned one has no conversion."""
    tag = None if tag is None else str(tag)  # DeepSpeed takes any tag, and names the folder str(tag)
    if tag is None:
        pointer = load_dir / (UNIVERSAL_POINTER if universal else "latest")
        tag = pointer.read_text().strip() if pointer.is_file() else None
        if tag is not None and universal:
            _check_not_older_than_latest(load_dir, tag)
    folder = load_dir / str(tag)
    if tag is None or not universal or (folder / "zero").is_dir() or not holds_partitioned_state(folder):
        return tag
    if (load_dir / f"{tag}{UNIVERSAL_SUFFIX}").is_dir():
        return f"{tag}{UNIVERSAL_SUFFIX}"
    raise CheckpointError(
        f"{folder}: checkpoint.load_universal is set, but this is not a universal checkpoint (no zero/ folder) and "
        f"has no conversion beside it. Fix: python -m meft_ds.universal {folder}; or, to resume with as many ranks "
        "as saved it, remove load_universal from the DeepSpeed config's checkpoint section."
    )


def _check_not_older_than_latest(load_dir: Path, universal_tag: str) -> None:
    newer = (load_dir / "latest").read_text().strip() if (load_dir / "latest").is_file() else ""
    newer_step, step = checkpoint_step(newer), checkpoint_step(universal_tag.removesuffix(UNIVERSAL_SUFFIX))
    if newer_step is not None and step is not None and newer_step > step:
        raise CheckpointError(
            f"{load_dir}: checkpoint.load_universal resumes from {universal_tag}, but a later checkpoint, {newer}, was "
            f"saved since. Fix: to resume from {newer} with as many ranks as saved it, remove load_universal from the "
            f"DeepSpeed config's checkpoint section (launch/train.py: --resume, not --resume_universal); with another "
            f"number of ranks, convert it first: python -m meft_ds.universal {load_dir / newer}."
        )


def holds_partitioned_state(folder: Path) -> bool:
    """Whether a checkpoint folder holds ZeRO's optimizer state partitioned over the ranks that saved it."""
    return any(folder.glob(PARTITIONED_STATE))


def checkpoint_step(tag: str) -> int | None:
    """The optimizer step of a checkpoint tag (DeepSpeed's ``global_step<N>``), or None for a tag of another form."""
    found = re.fullmatch(r"global_step(\d+)", tag)
    return int(found.group(1)) if found else None


def check_world_size(tag_dir: Path, world_size: int, *, universal: bool) -> None:
    """A :class:`CheckpointError` with the fix where ``tag_dir``'s ZeRO optimizer state is partitioned over another
    number of data-parallel ranks than ``world_size`` (DeepSpeed cannot repartition it; its universal checkpoint can).
    The row stores load at any number of ranks (:meth:`meft_ds.store.CpuRowStore.load`)."""
    saved = len(list(tag_dir.glob(PARTITIONED_STATE)))
    if universal or saved in (0, world_size):
        return
    raise CheckpointError(
        f"{tag_dir}: ZeRO's optimizer state was saved by {saved} data-parallel ranks, and this run has {world_size}. "
        f"Fix: convert it to a universal checkpoint (python -m meft_ds.universal {tag_dir}: DeepSpeed's converter, "
        'with the row stores) and resume with "checkpoint": {"load_universal": true} in the DeepSpeed config '
        f"(launch/train.py: --resume_universal); or resume with {saved} ranks."
    )


def check_has_stores(tag_dir: Path) -> None:
    """A :class:`CheckpointError` where a checkpoint folder holds DeepSpeed's files but not meft_ds's."""
    if tag_dir.is_dir() and not (tag_dir / STORE_DIR).is_dir():
        raise CheckpointError(
            f"{tag_dir}: no {STORE_DIR}/ folder (the row stores) beside DeepSpeed's files: a checkpoint saved without "
            "meft_ds attached, or converted by DeepSpeed's ds_to_universal alone, which leaves it out. Fix: resume "
            f"from a checkpoint the plugin saved; to convert one, use python -m meft_ds.universal (it copies "
            f"{STORE_DIR}/)."
        )


# --------------------------------------------------------------------------- the frozen base model
def base_sample(model: nn.Module) -> dict[str, torch.Tensor]:
    """``SAMPLES_PER_TENSOR`` evenly spaced values of every frozen parameter, by name, on the CPU in the parameter's
    dtype. A checkpoint leaves the frozen base model out, so resuming takes whatever base the run is given; this
    sample tells another base (say another fine-tune of the same architecture) from the one the run trained on. Under
    ZeRO-3 each parameter is gathered in turn, every rank taking part."""
    sample = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            continue
        with gathered(param):
            flat = param.detach().reshape(-1)
            count = min(SAMPLES_PER_TENSOR, flat.numel())
            picks = torch.arange(count) * (flat.numel() - 1) // max(count - 1, 1)  # integers: exact at any size
            sample[name] = flat[picks.to(flat.device)].cpu()
    return sample


def save_base_sample(directory: Path, sample: dict[str, torch.Tensor]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(sample, directory / BASE_SAMPLE)


def has_base_sample(directory: Path) -> bool:
    """Whether the checkpoint's ``directory`` keeps a sample: it leaves the base model out (checkpoints that hold it,
    and those saved before samples were kept, have none)."""
    return (directory / BASE_SAMPLE).is_file()


def check_base_sample(directory: Path, sample: dict[str, torch.Tensor]) -> None:
    """A :class:`CheckpointError` unless ``sample`` (the model resuming) matches the one saved in ``directory``: the
    same frozen parameters, equal values (within one rounding of the coarser dtype where the dtypes differ, e.g. a
    run saved in bf16 resumed in fp32)."""
    path = directory / BASE_SAMPLE
    saved = torch.load(path, map_location="cpu", weights_only=True)
    fix = f"Fix: resume with the base model the run was saved with; to continue on this one anyway, delete {path}."
    if saved.keys() != sample.keys():
        missing, extra = sorted(saved.keys() - sample.keys()), sorted(sample.keys() - saved.keys())
        raise CheckpointError(
            f"the model's frozen parameters are not those the checkpoint was trained on: missing {missing[:5]}, "
            f"not in the checkpoint {extra[:5]}. {fix}"
        )
    differing = [name for name, values in sample.items() if not _same_values(saved[name], values)]
    if differing:
        raise CheckpointError(
            f"the base model differs from the one this checkpoint was trained on: {len(differing)} of {len(sample)} "
            f"frozen parameters hold other values (first: {differing[0]}). The checkpoint holds only what training "
            f"changed, so it must resume on the same base. {fix}"
        )


def _same_values(saved: torch.Tensor, current: torch.Tensor) -> bool:
    if saved.shape != current.shape:
        return False
    if saved.dtype == current.dtype:
        return torch.equal(saved, current)
    if not (saved.is_floating_point() and current.is_floating_point()):
        return False
    coarser = max(saved.dtype, current.dtype, key=lambda dtype: torch.finfo(dtype).eps)
    a, b = saved.to(coarser).float(), current.to(coarser).float()
    return bool(torch.all((a - b).abs() <= torch.finfo(coarser).eps * torch.maximum(a.abs(), b.abs())))


def gathered(param: nn.Parameter) -> contextlib.AbstractContextManager:
    """The whole of ``param`` in place for the block: DeepSpeed's gather for a ZeRO-3 partitioned one."""
    if hasattr(param, "ds_id"):
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        return GatheredParameters([param], modifier_rank=None)
    return contextlib.nullcontext()
