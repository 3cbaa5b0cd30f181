"""meft_ds's CPU kernels (``csrc/meft_cpu.cpp``), JIT-built like DeepSpeed's own CPU ops and cached in
``$TORCH_EXTENSIONS_DIR``: DeepSpeed's ``CPUOpBuilder`` supplies ``-O3 -march=native -fopenmp`` and the SIMD width
it detects with py-cpuinfo. The kernels run on the host on every machine (the row store lives there), so they are
built with the CPU builder whatever the accelerator is.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from deepspeed.ops.op_builder.cpu.builder import CPUOpBuilder

SOURCE = Path(__file__).parent / "csrc" / "meft_cpu.cpp"


class MeftCPUBuilder(CPUOpBuilder):
    BUILD_VAR = "DS_BUILD_MEFT_CPU"
    NAME = "meft_cpu"

    def __init__(self) -> None:
        super().__init__(name=self.NAME)

    def absolute_name(self) -> str:
        return f"meft_ds.ops.{self.NAME}_op"

    def sources(self) -> list[str]:
        return [str(SOURCE)]

    def include_paths(self) -> list[str]:
        return []

    def cxx_args(self) -> list[str]:
        # sqrt may vectorize only when it need not set errno; nothing else about float semantics changes
        return [*super().cxx_args(), "-fno-math-errno"]


@functools.cache
def cpu_kernels() -> Any | None:
    """The compiled kernels, or ``None`` (warning once) when they cannot be built; callers then use torch code."""
    try:
        return MeftCPUBuilder().load(verbose=False)
    except Exception as error:  # the JIT build needs ninja and a C++ compiler; any failure falls back to torch
        warnings.warn(
            f"meft_ds: its CPU kernels could not be built ({type(error).__name__}: {error}); falling back to slower "
            "pure-torch code. Install ninja and a C++ compiler to fix.",
            stacklevel=2,
        )
        return None


def kernel_threads() -> int:
    """Threads for our kernels: torch's intra-op count, capped by this process's share of the cores it may run on
    (the cores in its affinity mask divided among the ranks of this node), so ranks never oversubscribe."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    return max(1, min(torch.get_num_threads(), cores // max(1, local_ranks)))
