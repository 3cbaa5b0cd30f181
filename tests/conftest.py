"""Test-wide environment: CPU accelerator, a fixed JIT-extension cache, a single-process distributed env."""

from __future__ import annotations

import os

# Before anything imports deepspeed: the CPU accelerator (explicitly; auto-detection is slower and one 2-rank run in
# four aborted at exit without it, ENVIRONMENT.md). The JIT-built ops come from torch's extension cache, where
# launch/setup.sh built them and every other entry point finds them too.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

TORCH_LINEAR = torch.nn.functional.linear


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _torch_linear_put_back() -> Iterator[None]:
    """A ZeRO-3 engine replaces torch.nn.functional.linear process-wide, for good (DeepSpeed's memory-efficient
    linear, which keeps every linear's input): put torch's back after each test, so that none runs under another's
    (the memory plan's activations measured differently after test_engine's ZeRO-3 tests)."""
    yield
    torch.nn.functional.linear = TORCH_LINEAR


@pytest.fixture(autouse=True)
def _remove_deepspeed_shm_buffers() -> Iterator[None]:
    """DeepSpeed's CPU communication gives each rank a 67 MB all-reduce buffer in /dev/shm (memory) and never unlinks
    it. meft_ds unlinks them once the engine is set up (test_launcher's launch() asserts it); a process that ends
    before that (a failing or killed test run) would still leave its own, ~6 GB over a session of ~90 launches: the
    buffers a test's processes created go when it ends (a process that still maps one keeps it until it exits)."""
    shm, pattern = Path("/dev/shm"), f"deepspeed_allreduce_buffer_{os.getuid()}_*"
    before = set(shm.glob(pattern))
    yield
    for path in set(shm.glob(pattern)) - before:
        path.unlink(missing_ok=True)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# A single-process "distributed" environment, so that deepspeed.initialize runs in-process without a launcher.
for _key, _value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
    os.environ.setdefault(_key, _value)
os.environ.setdefault("MASTER_PORT", str(_free_port()))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--async-accelerator",
        action="store_true",
        help="run every test under tests/async_accelerator.py's CPU accelerator that enforces CUDA's asynchrony",
    )


@pytest.fixture(autouse=True)
def _async_accelerator(request: pytest.FixtureRequest) -> Iterator[object]:
    if not request.config.getoption("--async-accelerator"):
        yield None
        return
    from async_accelerator import async_accelerator

    with async_accelerator() as harness:
        yield harness
