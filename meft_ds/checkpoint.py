"""The row stores inside a training checkpoint (atomic files: :mod:`meft_ds.files`; exported adapters:
:mod:`meft_ds.export`).
"""

from __future__ import annotations

import json
from pathlib import Path

from meft_ds.adapter import SparseKeyExpertAdapter
from meft_ds.sparse_adam import SparseRowAdam

STORE_OPTIMIZER = "optimizer.json"


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
    """Restore what :func:`save_stores` wrote; every mismatch is a :class:`meft_ds.store.CheckpointError` before any
    copy."""
    for adapter in model_adapters:
        adapter.store.check_saved(directory, adapter.layer_index)
    state = json.loads((directory / STORE_OPTIMIZER).read_text())
    for adapter in model_adapters:
        adapter.store.load(directory, adapter.layer_index)
        adapter.drop_row_grads()
        adapter.rows_changed()
    optimizer.load_state_dict({"state": {}, **state})
