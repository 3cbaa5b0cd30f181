"""The row store: one adapter's key and value rows, their Adam moments and gradients. :class:`RowStore` is the
interface of every tier; the rest of meft_ds reaches rows only through it:

* :meth:`RowStore.gather_into` fills a staging buffer with rows, cast to the dtype rows travel in (or
  :meth:`~RowStore.start_gather` starts it, to be completed later);
* :meth:`RowStore.score_probed` scores tokens against the keys of their probed experts (routing);
* :meth:`RowStore.accumulate_grad` / :meth:`~RowStore.accumulated_grads` / :meth:`~RowStore.grads_finite` /
  :meth:`~RowStore.drop_grads` keep the touched rows' gradients, by global row id;
* :meth:`RowStore.rows_for_update` hands the optimizer the rows it owns, to update in place, and
  :meth:`~RowStore.sum_over_shards` / :meth:`~RowStore.row_ids_updated_anywhere` tell it what the other ranks hold;
* :meth:`RowStore.save` / :meth:`~RowStore.load` write and read checkpoints, :meth:`~RowStore.full_rows` exports.

Three tiers implement it side by side: :class:`CpuRowStore` (here: every row in CPU memory),
:class:`meft_ds.shard.ShardedRowStore` (a CPU store of this rank's part of the rows, the rest on the other ranks) and
:class:`meft_ds.swap.NvmeRowStore` (keys in RAM, values and moments on NVMe).
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from meft_ds.accumulator import RowGradAccumulator
from meft_ds.ops import cpu_kernels, kernel_threads
from meft_ds.routing import score_probed_keys

RowsForUpdate = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # (rows, exp_avg, exp_avg_sq, index)


def _nothing() -> None:
    """What completes a gather that is complete already."""


class CheckpointError(ValueError):
    """A checkpoint or exported adapter is missing, incomplete, or does not match the model."""


def initial_keys(num_rows: int, dim: int, *, std: float, seed: int) -> torch.Tensor:
    """The ``(num_rows, dim)`` N(0, std) keys of a layer, the same on every rank and for every store tier."""
    return torch.empty(num_rows, dim).normal_(0.0, std, generator=torch.Generator().manual_seed(seed))


class RowStore(abc.ABC):
    """The interface of every store tier (see the module docstring). It holds no rows: the tiers do. What every tier
    does the same way, it implements once: the touched rows' gradients, kept by global row id in a
    :class:`~meft_ds.accumulator.RowGradAccumulator`, whatever holds the rows themselves.

    Attributes every tier sets: ``dim`` (d), ``num_rows`` (rows of the whole layer), ``[row_start, row_stop)`` (the
    rows this rank holds and updates), ``is_shard`` (each rank holds, and saves, only its part) and ``row_steps``
    (each held row's count of updates, int32, for per-row bias correction; ``None`` where the tier keeps none).
    ``reads_ahead``: whether :meth:`start_gather` reads in the background (NVMe), so that the adapter chooses rows
    before the FFN to overlap it; in-memory tiers gather where the rows are used, still in cache there.
    """

    dim: int
    num_rows: int
    row_start: int
    row_stop: int
    is_shard = False
    reads_ahead = False  # start_gather reads in the background, so starting it early overlaps other work
    row_steps: torch.Tensor | None = None
    initial_grad_rows = 0  # rows the gradient buffer makes room for when it is created (it grows past them)
    _accumulator: RowGradAccumulator | None = None

    @property
    @abc.abstractmethod
    def keys(self) -> torch.Tensor:
        """The ``(rows held, d)`` fp32 keys, in RAM in every tier (routing reads them)."""

    @property
    @abc.abstractmethod
    def nbytes(self) -> int:
        """CPU bytes held for the rows (the gradient accumulator aside)."""

    # ------------------------------------------------------------------ reading rows
    @abc.abstractmethod
    def gather_into(self, row_ids: torch.Tensor, out: torch.Tensor) -> None:
        """Rows ``row_ids`` (global ids, sorted) into ``out[:n]`` (``(>= n, 2, d)``, any float dtype)."""

    def start_gather(self, row_ids: torch.Tensor, out: torch.Tensor) -> Callable[[], None]:
        """:meth:`gather_into`, started: ``out`` is complete once the returned function has been called (a tier that
        reads asynchronously, NVMe, reads meanwhile; the others gather at once)."""
        self.gather_into(row_ids, out)
        return _nothing

    def routing_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """The hidden states (on the device, in the dtype they travel in) that go to the host for routing: these
        (a sharded store gathers every rank's there first, over the accelerator's backend)."""
        return hidden

    @abc.abstractmethod
    def score_probed(self, hidden: torch.Tensor, probe_ids: torch.Tensor, expert_size: int) -> torch.Tensor:
        """``(T, n_probe * expert_size)`` fp32 scores of ``hidden`` (CPU, the dtype it travelled in: a sharded store
        exchanges it so) against its probed experts' keys."""

    @abc.abstractmethod
    def full_rows(self) -> torch.Tensor:
        """All ``(num_rows, 2, d)`` rows of the layer (for exporting the adapter)."""

    @abc.abstractmethod
    def assign_rows(self, rows: torch.Tensor) -> None:
        """Set the rows held here from all ``(num_rows, 2, d)`` rows of the layer (loading an exported adapter)."""

    # ------------------------------------------------------------------ gradients
    @property
    def grad_accumulator(self) -> RowGradAccumulator:
        """The touched rows' gradients, by global row id (created at the first gradient, with room for
        ``initial_grad_rows``: a tier holding its rows in memory makes room for all of them at once, as
        :mod:`meft_ds.memory` budgets; the NVMe tier lets it grow with the rows touched)."""
        if self._accumulator is None:
            self._accumulator = RowGradAccumulator(self.num_rows, self.dim, capacity=self.initial_grad_rows)
        return self._accumulator

    @property
    def num_touched(self) -> int:
        """Rows holding an accumulated gradient."""
        return self.grad_accumulator.count

    def accumulate_grad(self, row_ids: torch.Tensor, grads: torch.Tensor, has_grad: torch.Tensor | None = None) -> None:
        """Add ``grads`` (``(n, 2, d)``, any float dtype; copied) to rows ``row_ids`` (unique), only where
        ``has_grad`` (``(n,)`` bool) is true, if given."""
        self.grad_accumulator.add(row_ids, grads, has_grad)

    def accumulated_grads(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The accumulated ``(row_ids, grads)`` (ids unique, in first-touch order; grads ``(n, 2, d)`` fp32, a view
        of the accumulator: in-place changes stay), or ``None`` when no row has a gradient."""
        return self.grad_accumulator.view()

    def grads_finite(self) -> bool:
        """Whether every accumulated gradient value is finite (known from the accumulation itself, see
        :mod:`meft_ds.accumulator`)."""
        return self.grad_accumulator.all_finite()

    def drop_grads(self) -> None:
        self.grad_accumulator.clear()

    # ------------------------------------------------------------------ the optimizer's view
    @abc.abstractmethod
    def rows_for_update(self, row_ids: torch.Tensor) -> AbstractContextManager[RowsForUpdate]:
        """``(rows, exp_avg, exp_avg_sq, index)``: tensors holding rows ``row_ids`` (owned here) at positions
        ``index``, to update in place; written back (where they are copies) when the block ends."""

    def start_update(self, row_ids: torch.Tensor) -> None:  # noqa: B027 (a hook: in-memory tiers have nothing to start)
        """Start fetching what :meth:`rows_for_update` will need for ``row_ids``, so that it arrives while the
        optimizer updates another store (the NVMe tier reads it; rows held in memory need nothing)."""

    def sum_over_shards(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over the ranks that hold parts of this store: ``value`` itself where this rank holds
        every row (a sharded store all-reduces it in place; every rank must call it)."""
        return value

    def row_ids_updated_anywhere(self, updated: torch.Tensor) -> torch.Tensor:
        """The rows an optimizer step changed in the whole store, given those it changed here (``updated``): the
        same rows where this rank holds every row. (A sharded store's owners each update their own part: every
        rank must call it, so that copies of rows held elsewhere are dropped too.)"""
        return updated

    # ------------------------------------------------------------------ files
    @abc.abstractmethod
    def file_name(self, layer_index: int) -> str:
        """The file (or folder) of ``layer_index``'s rows in a checkpoint directory."""

    @abc.abstractmethod
    def save(self, directory: Path, layer_index: int) -> None:
        """Write the rows and moments held here into a checkpoint directory."""

    @abc.abstractmethod
    def check_saved(self, directory: Path, layer_index: int) -> None:
        """Raise :class:`CheckpointError` unless ``directory`` holds this store's rows for ``layer_index`` in the
        right shape (nothing is loaded)."""

    @abc.abstractmethod
    def load(self, directory: Path, layer_index: int) -> None:
        """Restore what :meth:`save` wrote (call :meth:`check_saved` first, for every layer); drops the gradients."""

    @abc.abstractmethod
    def digest(self, into: hashlib._Hash) -> None:
        """Feed the rows and moments held here to a hash."""

    def training_state(self) -> dict[str, torch.Tensor]:
        """The rows, their moments and per-row step counts, as tensors (the store's own, not copies), for an
        optimizer's ``state_dict``: what a plain loop saves to resume. Only a store that holds every row in this
        process's memory has them to give."""
        raise CheckpointError(
            f"{type(self).__name__}: the rows are not all in this process's memory (the NVMe tier, or sharded over the "
            "ranks), so SparseRowAdam.state_dict() cannot hold them. Fix: train with DeepSpeed "
            "(meft_ds.initialize, or meft_ds.attach with Accelerate), whose checkpoints save every store tier; or "
            "save the trained adapter alone with meft_ds.save_adapter."
        )

    def check_training_state(self, state: dict[str, torch.Tensor]) -> None:
        """A :class:`CheckpointError` unless ``state`` (a :meth:`training_state`) fits this store."""
        mine = self.training_state()
        if state.keys() != mine.keys() or any(state[k].shape != mine[k].shape for k in mine):
            saved = tuple(state["rows"].shape) if "rows" in state else sorted(state)
            raise CheckpointError(
                f"SparseRowAdam.load_state_dict: saved rows {saved} do not fit this layer's "
                f"{tuple(mine['rows'].shape)} (rows, 2, hidden size). Fix: load the state into the model and meft "
                "settings it was saved from."
            )

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a :meth:`training_state` (:meth:`check_training_state` first); drops the gradients."""
        for name, target in self.training_state().items():
            target.copy_(state[name])
        self.drop_grads()


class CpuRowStore(RowStore):
    """Owns the fp32 master rows ``[row_start, row_stop)`` of one adapter in CPU memory (all ``num_rows`` unless a
    subclass shards them); the adapter only borrows fetched copies for one micro-step.

    Row ``i`` of ``rows`` holds ``(key_i, value_i)`` side by side, so the rows a micro-batch needs are one gather
    (one staging buffer, one copy each way) and one contiguous block for the optimizer. ``keys`` and ``values`` are
    writable ``(rows held, d)`` views.
    """

    def __init__(self, keys: torch.Tensor, *, row_start: int = 0, num_rows: int | None = None) -> None:
        held, self.dim = keys.shape
        self.row_start = row_start
        self.row_stop = row_start + held
        self.num_rows = held if num_rows is None else num_rows
        self.initial_grad_rows = held
        self.rows = torch.zeros(held, 2, self.dim)
        self.rows[:, 0] = keys
        # values start at zero, so an injected model starts exactly at the base model
        self.exp_avg = torch.zeros_like(self.rows)
        self.exp_avg_sq = torch.zeros_like(self.rows)
        # updates of each row, for per-row bias correction (SparseRowAdam(bias_correction="per_row"))
        self.row_steps = torch.zeros(held, dtype=torch.int32)

    @property
    def keys(self) -> torch.Tensor:
        return self.rows[:, 0]

    @property
    def values(self) -> torch.Tensor:
        return self.rows[:, 1]

    @property
    def nbytes(self) -> int:
        """CPU bytes of the rows and moments (the accumulator is bounded by the same size and usually far smaller)."""
        return sum(t.numel() * t.element_size() for t in (self.rows, self.exp_avg, self.exp_avg_sq))

    # ------------------------------------------------------------------ reading rows
    def gather_into(self, row_ids: torch.Tensor, out: torch.Tensor) -> None:
        local = row_ids - self.row_start
        kernels = cpu_kernels()
        if kernels is None:
            out[: row_ids.numel()].copy_(self.rows.index_select(0, local))
        else:  # gather and cast in one pass
            kernels.gather_rows(self.rows, local, out, kernel_threads())

    def score_probed(self, hidden: torch.Tensor, probe_ids: torch.Tensor, expert_size: int) -> torch.Tensor:
        return score_probed_keys(hidden.float(), probe_ids, self.keys, expert_size, self.row_start // expert_size)

    def full_rows(self) -> torch.Tensor:
        return self.rows

    def assign_rows(self, rows: torch.Tensor) -> None:
        self.rows.copy_(rows[self.row_start : self.row_stop])

    # ------------------------------------------------------------------ the optimizer's view
    @contextlib.contextmanager
    def rows_for_update(self, row_ids: torch.Tensor) -> Iterator[RowsForUpdate]:
        yield self.rows, self.exp_avg, self.exp_avg_sq, row_ids - self.row_start

    # ------------------------------------------------------------------ files
    def file_name(self, layer_index: int) -> str:
        return f"layer_{layer_index}.safetensors"

    def _held(self) -> dict[str, torch.Tensor]:
        """The rows held here, their moments and step counts: what a checkpoint file and an optimizer state keep."""
        return {"rows": self.rows, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "row_steps": self.row_steps}

    def save(self, directory: Path, layer_index: int) -> None:
        save_file(self._held(), str(directory / self.file_name(layer_index)))

    def check_saved(self, directory: Path, layer_index: int) -> None:
        shapes = {path.name: shape for _, shape, path in saved_pieces(directory, layer_index)}
        total = sum(shape[0] for shape in shapes.values())
        if any(shape[1:] != (2, self.dim) for shape in shapes.values()) or total != self.num_rows:
            raise CheckpointError(
                f"{directory}: layer {layer_index}'s saved rows {shapes} do not make the ({self.num_rows}, 2, "
                f"{self.dim}) (rows, 2, hidden size) it holds. Fix: resume with the meft settings and model of the run "
                "that wrote the checkpoint."
            )

    def load(self, directory: Path, layer_index: int) -> None:
        """Read this store's rows ``[row_start, row_stop)`` from the saved files that hold them, whatever number of
        ranks wrote them: a whole layer's file or every rank's shard (only the rows held here are read)."""
        for start, shape, path in saved_pieces(directory, layer_index):
            lo, hi = max(start, self.row_start), min(start + shape[0], self.row_stop)
            if lo >= hi:
                continue
            with safe_open(str(path), framework="pt") as saved:
                names = set(saved.keys())
                for name, target in self._held().items():
                    held = target[lo - self.row_start : hi - self.row_start]
                    if name in names:
                        held.copy_(saved.get_slice(name)[lo - start : hi - start])
                    else:  # checkpoints written before per-row bias correction have no step counts: rows count from 0
                        held.zero_()
        self.drop_grads()

    def training_state(self) -> dict[str, torch.Tensor]:
        return super().training_state() if self.is_shard else self._held()

    def digest(self, into: hashlib._Hash) -> None:
        for tensor in (self.rows, self.exp_avg, self.exp_avg_sq):
            into.update(memoryview(tensor.contiguous().numpy()))


def shard_file_name(layer_index: int, rank: int, world_size: int) -> str:
    """The file of ``rank``'s part of ``layer_index``'s rows, in a checkpoint of ``world_size`` sharded ranks."""
    return f"layer_{layer_index}.shard_{rank}_of_{world_size}.safetensors"


def saved_pieces(directory: Path, layer_index: int) -> list[tuple[int, tuple[int, ...], Path]]:
    """The files holding ``layer_index``'s rows in a checkpoint ``directory``, each with its first row and the shape
    of its rows (read from the file's header): the whole layer's (a replicated store's, written by one rank) or every
    rank's shard of one sharded run, in row order. A :class:`CheckpointError` where there is none, or a shard is
    missing."""
    whole = directory / f"layer_{layer_index}.safetensors"
    if whole.is_file():
        return [(0, _saved_rows_shape(whole), whole)]
    shards = sorted(directory.glob(f"layer_{layer_index}.shard_*_of_*.safetensors"))
    worlds = {int(path.name.rsplit("_of_", 1)[1].split(".")[0]) for path in shards}
    if not shards:
        raise CheckpointError(
            f"{directory}: the checkpoint has no row store for layer {layer_index}. Fix: resume with the same "
            "meft.layers and meft.store.device as the run that wrote it."
        )
    if len(worlds) > 1:
        raise CheckpointError(
            f"{directory}: layer {layer_index}'s rows are saved by sharded runs of {sorted(worlds)} ranks, one "
            "checkpoint over another. Fix: resume from a checkpoint folder one run wrote."
        )
    world = worlds.pop()
    paths = [directory / shard_file_name(layer_index, rank, world) for rank in range(world)]
    missing = [path.name for path in paths if not path.is_file()]
    if missing:
        raise CheckpointError(
            f"{directory}: the shards {missing} of layer {layer_index}'s rows are missing (each of the {world} ranks "
            "that wrote the checkpoint saves its own). Fix: copy every rank's files into the checkpoint folder."
        )
    pieces, start = [], 0
    for path in paths:
        shape = _saved_rows_shape(path)
        pieces.append((start, shape, path))
        start += shape[0]
    return pieces


def _saved_rows_shape(path: Path) -> tuple[int, ...]:
    with safe_open(str(path), framework="pt") as saved:
        return tuple(saved.get_slice("rows").get_shape())
