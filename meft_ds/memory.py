"""How much CPU memory the row stores will take, checked before a byte of them is allocated.

Per adapter layer the store holds fp32 rows (keys and values: ``2 * r * d``), two Adam moments of the same size,
and a gradient accumulator that holds at most every row once; a sharded store holds ``1/world`` of that per rank. A
configuration that would not fit is refused with the largest ``num_neurons`` that would.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch.distributed

from meft_ds.config import MeftConfig, MeftConfigError
from meft_ds.ops import local_world_size

FP32 = 4
HEADROOM = 0.9  # leave a tenth of what is available to the model, the activations and everything else


def store_bytes(num_layers: int, num_neurons: int, dim: int) -> int:
    """Worst-case CPU bytes of the stores: rows, two moments and a full gradient accumulator, per layer."""
    return num_layers * 4 * num_neurons * 2 * dim * FP32


def available_bytes() -> int:
    """Memory this process may still use: ``MemAvailable`` (Linux), shared by the ranks of this node."""
    meminfo = Path("/proc/meminfo")
    available = None
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    if available is None:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return available // local_world_size()


def check_store_fits(config: MeftConfig, num_layers: int, dim: int, *, available: int | None = None) -> None:
    """Raise :class:`MeftConfigError` (with a configuration that fits) when the stores would not fit in memory."""
    available = available_bytes() if available is None else available
    if config.store.device == "nvme":  # values and moments on NVMe; memory holds the keys and read buffers
        return check_nvme_ram(config, num_layers, dim, available)
    sharded = config.store.shard is True and torch.distributed.is_initialized()  # after resolve_shard
    shards = torch.distributed.get_world_size() if sharded else 1
    needed = store_bytes(num_layers, config.num_neurons, dim) // shards
    budget = int(available * HEADROOM)
    if needed <= budget:
        return
    per_neuron = store_bytes(num_layers, 1, dim) / shards
    fitting = int(budget // per_neuron)
    step = config.top_k  # a multiple of K keeps a sensible expert split available
    fitting = (fitting // step) * step
    suggestion = (
        f"num_neurons={fitting} (or fewer layers with meft.layers)"
        if fitting >= config.top_k
        else "fewer layers with meft.layers"
    )
    raise MeftConfigError(
        f"meft.num_neurons: the row stores of {num_layers} layers x {config.num_neurons} neurons x d={dim} need "
        f"{needed / 2**30:.1f} GiB of CPU memory (fp32 rows, two Adam moments, gradient accumulator) but only "
        f"{available / 2**30:.1f} GiB is available to this process. Fix: use {suggestion}."
    )


def check_nvme_ram(config: MeftConfig, num_layers: int, dim: int, available: int) -> None:
    """The NVMe tier's RAM budget holds every layer's keys and read buffers, and fits in memory."""
    from meft_ds.nvme_folder import nvme_ram_needed  # the tier's own arithmetic (and only needed with it)

    budget = int(config.store.ram_budget_mb * 2**20)
    needed = num_layers * nvme_ram_needed(config.num_neurons, dim)
    if budget < needed:
        raise MeftConfigError(
            f"meft.store.ram_budget_mb: {config.store.ram_budget_mb:g} MiB, but the NVMe tier keeps every layer's "
            f"keys in RAM ({num_layers} layers x {config.num_neurons} x d={dim} x 4 bytes) with read buffers: at "
            f"least {needed / 2**20:.2f} MiB. Fix: raise ram_budget_mb to at least {needed / 2**20:.2f} (more makes "
            "larger reads), or use fewer neurons or layers."
        )
    if budget > available * HEADROOM:
        raise MeftConfigError(
            f"meft.store.ram_budget_mb: {config.store.ram_budget_mb:.0f} MiB for the NVMe tier's keys and read "
            f"buffers, but only {available / 2**20:.0f} MiB is available to this process. Fix: set ram_budget_mb below "
            f"{available * HEADROOM / 2**20:.0f}."
        )
