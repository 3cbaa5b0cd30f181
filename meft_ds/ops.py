"""meft_ds's CPU kernels (``csrc/meft_cpu.cpp``), JIT-built like DeepSpeed's own CPU ops and cached in
``$TORCH_EXTENSIONS_DIR``: DeepSpeed's ``CPUOpBuilder`` supplies ``-O3 -march=native -fopenmp`` and the SIMD width
it detects with py-cpuinfo. The kernels run on the host on every machine (the row store lives there), so they are
built with the CPU builder whatever the accelerator is.
"""

from __future__ import annotations

import copy
import functools
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from deepspeed.ops.op_builder.cpu.builder import CPUOpBuilder

SOURCE = Path(__file__).parent / "csrc" / "meft_cpu.cpp"
SOURCES = [SOURCE, SOURCE.with_name("adapter.cpp")]  # csrc/common.h is what they share


class MeftCPUBuilder(CPUOpBuilder):
    BUILD_VAR = "DS_BUILD_MEFT_CPU"
    NAME = "meft_cpu"

    def __init__(self) -> None:
        super().__init__(name=self.NAME)

    def absolute_name(self) -> str:
        return f"meft_ds.ops.{self.NAME}_op"

    def sources(self) -> list[str]:
        return [str(source) for source in SOURCES]

    def include_paths(self) -> list[str]:
        return []

    def cxx_args(self) -> list[str]:
        # sqrt may vectorize only when it need not set errno; nothing else about float semantics changes. No -g:
        # debug info of torch's headers is a third of the build's time (measured: 77 s -> 53 s a source), and every
        # fresh machine, CI run and wheel install builds these kernels once.
        return [arg for arg in super().cxx_args() if arg != "-g"] + ["-fno-math-errno"]


def read_cpu_info_once() -> None:
    """Have py-cpuinfo read this CPU once per process (``meft_ds`` calls this when imported).

    ``cpuinfo.get_cpu_info()`` takes ~1.1 s: it runs a subprocess that times the CPU. DeepSpeed calls it afresh each
    time a CPU op builder is asked for its flags and each time a ``DeepSpeedCPUAdam`` is made: five readings, 5.5 s of
    every launch of launch/train.py, on every rank (cProfile, Intel Xeon, 2 cores). Afterwards every caller gets a copy
    of the first reading. Nothing is kept across processes: a home directory shared by different machines would hand
    one CPU's flags to another."""
    try:
        import cpuinfo
    except ImportError:  # DeepSpeed then asks lscpu, which is fast
        return
    if getattr(cpuinfo.get_cpu_info, "read_once", False):
        return
    reading = functools.cache(cpuinfo.get_cpu_info)

    @functools.wraps(cpuinfo.get_cpu_info)
    def get_cpu_info() -> dict[str, Any]:
        return copy.deepcopy(reading())

    get_cpu_info.read_once = True  # type: ignore[attr-defined]
    cpuinfo.get_cpu_info = get_cpu_info


TORCH_FALLBACK_ENV = "MEFT_DS_TORCH_FALLBACK"


class KernelBuildError(RuntimeError):
    """meft_ds's CPU kernels could not be built, and the slow pure-torch fallback was not asked for."""


STALE_LOCK_SECONDS = 600  # longer than a build of any op takes (these kernels: about a minute on 2 cores)


@functools.cache
def check_build_locks() -> None:
    """Refuse a JIT build's ``lock`` file older than any build takes: a build killed mid-way (Ctrl-C during a first
    run's kernel build) leaves it, and torch then waits for it to go before it builds or loads that op again (ours or
    DeepSpeed's), forever and silently. Checked once per process, before the first kernel is built or loaded."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    now = time.time()
    # $TORCH_EXTENSIONS_DIR/<op>/lock, or <default root>/<python and device, e.g. py311_cpu>/<op>/lock
    for lock in sorted((*root.glob("*/lock"), *root.glob("*/*/lock"))):
        try:
            minutes = (now - lock.stat().st_mtime) / 60
        except FileNotFoundError:  # released since it was listed
            continue
        if minutes > STALE_LOCK_SECONDS / 60:
            raise KernelBuildError(
                f"{lock}: the lock of a kernel build that was interrupted, {minutes:.0f} minutes ago; torch waits for "
                f"it to go, forever, before it builds or loads that op again. Fix: delete it (rm {lock}) if no process "
                "is building kernels now."
            )


@functools.cache
def _build() -> tuple[Any | None, Exception | None]:
    """The compiled kernels, or why they could not be built (built once per process)."""
    try:
        missing = [str(source) for source in (*SOURCES, SOURCE.with_name("common.h")) if not source.is_file()]
        if missing:
            raise FileNotFoundError(f"{', '.join(missing)} missing from this installation")
        return MeftCPUBuilder().load(verbose=False), None
    except Exception as error:  # the JIT build needs ninja and a C++ compiler
        return None, error


def cpu_kernels() -> Any | None:
    """The compiled kernels (``meft_ds/csrc/meft_cpu.cpp``, shipped with the package, JIT-built on first use).

    When they cannot be built this raises :class:`KernelBuildError` with the fix: a run several times slower than it
    should be is worse than a clear message. With ``MEFT_DS_TORCH_FALLBACK=1`` it returns ``None`` instead (warning
    once) and callers run pure-torch code that computes the same."""
    check_build_locks()
    kernels, error = _build()
    if error is None:
        return kernels
    reason = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"
    if os.environ.get(TORCH_FALLBACK_ENV) == "1":
        _warn_fallback(reason)
        return None
    raise KernelBuildError(
        f"meft_ds: its CPU kernels could not be built ({reason}). Fix: install a C++ compiler and ninja (the kernels "
        f"are JIT-built from {SOURCE} on first use, like DeepSpeed's CPU ops), or set {TORCH_FALLBACK_ENV}=1 to run "
        "the pure-torch code instead (several times slower)."
    ) from error


@functools.cache
def _warn_fallback(reason: str) -> None:
    warnings.warn(
        f"meft_ds: its CPU kernels could not be built ({reason}); {TORCH_FALLBACK_ENV}=1, so the slower pure-torch "
        "code runs instead.",
        stacklevel=3,
    )


def kernel_threads() -> int:
    """Threads for our kernels: torch's intra-op count, capped by this process's share of the cores it may run on
    (the cores in its affinity mask divided among the ranks of this node), so ranks never oversubscribe."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(torch.get_num_threads(), cores // local_world_size()))


def local_world_size() -> int:
    """Ranks of this run on this node, as the launcher says (torchrun: ``LOCAL_WORLD_SIZE``, DeepSpeed's:
    ``LOCAL_SIZE``); 1 without a launcher."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1))
