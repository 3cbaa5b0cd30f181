"""Pieces of a training script that every launcher shares: a deterministic batch order, metric logs, a bar."""

from __future__ import annotations

import csv
import json
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from meft_ds.config import MeftConfigError, merge_settings
from meft_ds.data import DatasetError
from meft_ds.files import atomic_file
from meft_ds.inject import UnsupportedModelError, adapters
from meft_ds.models import ModelLoadError
from meft_ds.ops import KernelBuildError
from meft_ds.store import CheckpointError

MB = 1e6


class UsageError(ValueError):
    """A launcher's argument that cannot be used as given (an output folder that cannot be made, ``--resume`` with
    nothing to resume); the message names the argument and the fix."""


BAD_INPUT = (
    MeftConfigError,
    DatasetError,
    ModelLoadError,
    UnsupportedModelError,
    CheckpointError,
    KernelBuildError,
    UsageError,
)


def run_cli(main: Callable[[], int]) -> None:
    """Run a launcher's ``main`` and exit with its code. Bad input (config, dataset, model, checkpoint, arguments,
    kernels that cannot be built) ends in one ``error: ...`` line on stderr and exit code 2 rather than a traceback,
    Ctrl-C in one ``interrupted`` line and exit code 130 (as a shell reports SIGINT); ``MEFT_DEBUG=1`` shows the
    traceback.

    After a successful ``main`` the process groups are destroyed while the interpreter is whole: left to its teardown,
    gloo's worker threads can abort a finished run ("terminate called without an active exception", exit code -6;
    pytorch/pytorch#190489), as one 2-rank CI run here did. Only on success, where every rank gets there: a rank that
    failed may have left the others inside a collective."""
    try:
        code = main()
    except BAD_INPUT as error:
        if os.environ.get("MEFT_DEBUG"):
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C where the launcher has nothing more to say (loading, evaluating): no traceback
        if os.environ.get("MEFT_DEBUG"):
            raise
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    if not code and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.exit(code)


def free_port() -> int:
    """A free TCP port on this host (a launcher's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["num_neurons=8192", "gate=none", "layers=[0,1]", "store.shard=false"]`` -> a dict; values are JSON when
    they parse. A dotted key sets one setting of a section (``{"store": {"shard": False}}``), which
    :func:`meft_ds.config.merge_settings` merges into the config's section instead of replacing it."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        path = key.split(".")
        if not sep or not all(path):
            raise MeftConfigError(f"--meft {pair!r}: expected KEY=VALUE. Fix: e.g. --meft num_neurons=8192 or --meft "
                                  "store.shard=false.")  # fmt: skip
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        overrides = merge_settings(overrides, _nested(path, value))
    return overrides


def _nested(path: list[str], value: Any) -> dict[str, Any]:
    """``{"a": {"b": value}}`` for the path ``["a", "b"]``."""
    for name in reversed(path):
        value = {name: value}
    return value


class MicroBatchStream:
    """Which examples micro-batch ``g`` holds, from ``g`` alone: an endless sequence of seeded permutations.

    A launcher asks for ``g = (step * grad_accum + micro) * world_size + rank``, so a resumed run sees exactly the
    batches the uninterrupted run would have, and 1 rank with accumulation 2 sees the same examples per optimizer
    step as 2 ranks without accumulation.
    """

    def __init__(self, num_examples: int, micro_batch_size: int, *, seed: int) -> None:
        if num_examples < 1:
            raise MeftConfigError("dataset: no training examples. Fix: check --dataset / --train_limit.")
        self.num_examples = num_examples
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._orders = {epoch: torch.randperm(self.num_examples, generator=generator).tolist()}
        return self._orders[epoch]

    def indices(self, micro_batch: int) -> list[int]:
        start = micro_batch * self.micro_batch_size
        positions = range(start, start + self.micro_batch_size)
        return [self._order(p // self.num_examples)[p % self.num_examples] for p in positions]


def changed_batch_warning(saved_batch: int | None, batch: int, step: int) -> str | None:
    """What a run resumed at ``step`` with ``batch`` examples a step (micro-batch x accumulation x ranks) must be told
    where the checkpoint trained with ``saved_batch``: the batch order is a function of the step
    (:class:`MicroBatchStream`), so it goes on from another example than the one the run had reached. None where the
    batch is the same (or the checkpoint, older, does not say)."""
    if saved_batch is None or saved_batch == batch:
        return None
    reached, goes_on = step * saved_batch, step * batch
    skipped = f"skips examples {reached}-{goes_on - 1} of its stream"
    repeated = f"sees examples {goes_on}-{reached - 1} of its stream again"
    what = skipped if goes_on > reached else repeated
    return (
        f"resumed at step {step} with {batch} examples a step (micro-batch x accumulation x ranks), where the "
        f"checkpoint trained with {saved_batch}: the data order goes by the step, so this run {what}. To go "
        f"on where it stopped, keep --micro_batch_size x --gradient_accumulation_steps x ranks at "
        f"{saved_batch}."
    )


def changed_data_warning(saved_examples: int | None, examples: int) -> str | None:
    """What a run resumed with ``examples`` training examples must be told where the checkpoint's run had
    ``saved_examples``: each pass's order is drawn over the count (:class:`MicroBatchStream`), so the batches go on
    in another order than the stopped run's. None where the count is the same (or the checkpoint does not say)."""
    if saved_examples is None or saved_examples == examples:
        return None
    return (
        f"resumed with {examples} training examples, where the checkpoint's run had {saved_examples}: the data "
        "changed (the dataset, --train_limit, --max_length or --rehearsal), so the batches go on in another order "
        "than the stopped run's. To go on where it stopped, resume with the data it trained on."
    )


def progress_bar(total: int, *, initial: int = 0, enabled: bool = True) -> tqdm:
    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=not enabled, dynamic_ncols=True)


class MetricsLog:
    """One record per optimizer step, appended to ``metrics.jsonl`` and ``metrics.csv`` (flushed at every line, so
    an interrupted run keeps them) and sent to DeepSpeed's monitors (TensorBoard, CSV, W&B as the config enables
    them). A run that starts at step ``start_step`` (0, or the step a resumed checkpoint holds) first drops the
    records after it, which a killed run may have written past its last checkpoint: the files then hold each step
    once, as an uninterrupted run would."""

    # epoch: passes over the training examples so far (launch/train.py); eval_loss: only in the records of the steps
    # that evaluate (launch/train.py --eval_steps)
    FIELDS = ("step", "loss", "lr", "grad_norm", "rows_fetched", "rows_updated", "mb_to_device", "mb_to_host",
              "mb_moved", "seconds", "epoch", "eval_loss")  # fmt: skip

    def __init__(self, output_dir: Path, *, enabled: bool, start_step: int = 0, monitor: Any = None) -> None:
        self.enabled = enabled
        self.monitor = monitor if monitor is not None and getattr(monitor, "enabled", False) else None
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        jsonl_path, csv_path = output_dir / "metrics.jsonl", output_dir / "metrics.csv"
        kept = [line for line in _read_lines(jsonl_path) if json.loads(line)["step"] <= start_step]
        with atomic_file(jsonl_path) as temporary:
            temporary.write_text("".join(line + "\n" for line in kept))
        with atomic_file(csv_path) as temporary, open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.FIELDS)
            writer.writeheader()
            writer.writerows(json.loads(line) for line in kept)
        self._jsonl = open(jsonl_path, "a")  # noqa: SIM115 - appended to for the whole run
        self._csv = open(csv_path, "a", newline="")  # noqa: SIM115
        self._csv_writer = csv.DictWriter(self._csv, fieldnames=self.FIELDS)

    @staticmethod
    def step_record(
        engine: Any, model: torch.nn.Module, traffic_before: dict[str, int], loss: float, seconds: float
    ) -> dict[str, Any]:
        """The metrics of the optimizer step that just ended (traffic as the difference of the counters; zero for an
        engine without meft adapters)."""
        after = {}
        for adapter in adapters(model):
            for key, value in adapter.traffic.as_dict().items():
                after[key] = after.get(key, 0) + value
        delta = {key: after[key] - traffic_before.get(key, 0) for key in after}
        plugin = getattr(engine, "meft", None)
        to_device, to_host = delta.get("bytes_to_device", 0) / MB, delta.get("bytes_to_host", 0) / MB
        norm = engine.get_global_grad_norm()  # with meft: the engine's gradients and the rows' (MeftPlugin)
        return {
            "step": int(engine.global_steps),
            "loss": float(loss),
            "lr": float(plugin.last_lr if plugin is not None and plugin.last_lr is not None else engine.get_lr()[0]),
            "grad_norm": None if norm is None else float(norm),
            "rows_fetched": delta.get("rows_fetched", 0),
            "rows_updated": delta.get("rows_updated", 0),
            "mb_to_device": round(to_device, 4),
            "mb_to_host": round(to_host, 4),
            "mb_moved": round(to_device + to_host, 4),
            "seconds": round(seconds, 3),
        }

    def write(self, record: dict[str, Any]) -> None:
        if self.first_loss is None:
            self.first_loss = record["loss"]
        self.last_loss = record["loss"]
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        self._csv_writer.writerow(record)
        self._csv.flush()
        if self.monitor is not None:
            events = [
                (f"Train/meft/{key}", value, record["step"])
                for key, value in record.items()
                if key != "step" and value is not None
            ]
            self.monitor.write_events(events)


def _read_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
