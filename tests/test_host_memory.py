"""`keep_freed_host_memory`: a large tensor allocated and freed every step stops costing page faults."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

STEPS = """
import resource, sys, torch
from meft_ds.host_memory import keep_freed_host_memory
if sys.argv[1] == "keep":
    assert keep_freed_host_memory()
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(10 * 2**20).fill_(1.0)  # 40 MB, freed at once: above glibc's largest mmap threshold (32 MB)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(max(faults[-4:]))
"""


def faults_per_step(mode: str) -> int:
    """The most page faults of one of the last 4 of 12 steps, in a fresh process (the setting is process-wide).
    glibc places an aligned block freed this way beside the next one for a few steps before it reuses it: the heap
    grows by a few blocks, then stays."""
    result = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True)
    return int(result.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc tunables")
def test_a_freed_block_is_reused_instead_of_faulted_in_again() -> None:
    pages = 40 * 2**20 // 4096
    assert faults_per_step("default") >= pages // 2  # glibc maps and unmaps it every step
    assert faults_per_step("keep") < pages // 100  # once in the heap, it stays there
