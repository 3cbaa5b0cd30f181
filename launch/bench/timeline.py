"""Where a MEFT micro-step's host time goes, phase by phase: wall-clock timers around meft_ds's functions.

Each phase is a list of functions (class attributes, or attributes of the compiled kernels' module); a timed call's
own time is charged to its phase, minus the timed calls inside it (a gather inside an upload counts as gather). The
"before" column (``docs/bench/c_timeline_before.json``, one record per CPU) was measured with the harness of 7092d32
on the library of 2590f3c, each checked out apart: ``PYTHONPATH=<2590f3c>:<7092d32>/launch
TORCH_EXTENSIONS_DIR=<empty dir> python -m bench.timeline --out before.json`` (its own extension cache: its kernels
differ).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable
from typing import Any

from meft_ds import adapter, ops, sparse_adam, store, transfer

# phase -> (owner, attribute name) of the functions whose own time it is
PHASES: dict[str, list[tuple[Any, str]]] = {
    "routing (score + top-K)": [(adapter.SparseKeyExpertAdapter, "_route")],
    "gather + cast of rows": [(store.CpuRowStore, "gather_into")],
    "copies (rows, indices, routing inputs)": [
        (transfer.RowTransfer, name) for name in ("_upload", "indices_to_device", "to_host_async")
    ],
    "forward kernel": [("kernels", "sparse_adapter_forward")],
    "backward kernel (+ router's)": [("kernels", "sparse_adapter_backward"), ("kernels", "gate_backward")],
    "gradient hand-over": [
        *((transfer.RowTransfer, name) for name in ("accept_grads", "grad_destination", "flush")),
        (transfer._Handover, "complete"),
    ],
    "accumulation": [(store.RowStore, "accumulate_grad")],  # every tier's, the interface's own
    "sparse step: finiteness check": [(sparse_adam.SparseRowAdam, "row_grads_finite")],
    "sparse step: update": [(sparse_adam.SparseRowAdam, "step")],
}


def timed_steps(step: Callable[[], None], steps: int) -> dict[str, float]:
    """``{phase: seconds}`` over ``steps`` calls of ``step``, plus ``"step"``: their total wall time. Every phase's
    functions are wrapped in timers for these calls and put back after them."""
    seconds = dict.fromkeys(PHASES, 0.0)
    children: list[float] = []  # time of timed calls inside each open timed call

    def timer(phase: str, function: Callable) -> Callable:
        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            children.append(0.0)
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                seconds[phase] += elapsed - children.pop()
                if children:
                    children[-1] += elapsed

        return timed

    kernels = ops.cpu_kernels()
    with contextlib.ExitStack() as restore:  # puts the originals back in reverse order
        for phase, functions in PHASES.items():
            for owner, name in functions:
                target = kernels if owner == "kernels" else owner
                original = target.__dict__[name] if isinstance(target, type) else getattr(target, name)
                setattr(target, name, timer(phase, original))
                restore.callback(setattr, target, name, original)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        total = time.perf_counter() - start
    return {**seconds, "step": total}


def per_layer_ms(measured: dict[str, Any]) -> dict[str, float]:
    """``{phase: ms per layer and micro-step}`` of a :func:`timed_steps` record (``seconds``, ``steps``, ``layers``),
    with ``"host"`` (all phases) and ``"step"`` (the whole step, per micro-step)."""
    seconds, steps, layers = measured["seconds"], measured["steps"], measured["layers"]
    ms = {phase: 1e3 * value / steps / layers for phase, value in seconds.items() if phase != "step"}
    ms["host"] = sum(ms.values())
    ms["step"] = 1e3 * seconds["step"] / steps
    return ms


def table(after: dict[str, Any], before: dict[str, Any] | None = None) -> list[list[str]]:
    """Header and rows: each phase's ms per layer and micro-step (before, after, their ratio), and per micro-step."""
    now = per_layer_ms(after)
    then = per_layer_ms(before) if before is not None else {}
    labels = {"host": "meft_ds host work, all phases", "step": "whole micro-step (per step, not per layer)"}
    rows = [["host phase", "ms / layer, before", "ms / layer", "after ÷ before", "ms / micro-step"]]
    for phase in [*PHASES, "host", "step"]:
        value, old = now.get(phase, 0.0), then.get(phase)
        per_step = value if phase == "step" else value * after["layers"]
        rows.append([
            labels.get(phase, phase), "-" if old is None else f"{old:.2f}", f"{value:.2f}",
            "-" if not old else f"{value / old:.2f}x", f"{per_step:.0f}",
        ])  # fmt: skip
    return rows
