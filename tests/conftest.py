"""Test-wide environment: CPU accelerator, a fixed JIT-extension cache, a single-process distributed env."""

from __future__ import annotations

import os
from pathlib import Path

# Before anything imports deepspeed: the CPU accelerator (explicitly; auto-detection is slower and one 2-rank run in
# four aborted at exit without it, ENVIRONMENT.md) and one fixed cache for the JIT-built ops, shared with .ci/run.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "meft_ds" / "torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
