"""A process SIGKILLed at any point of a checkpoint save leaves the previous checkpoint loadable and intact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from crash_driver import CONFIG
from tiny_models import tiny_model

import meft_ds

HERE = Path(__file__).parent
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("point", ["engine_files", "store_files", "publish", "between_renames", "latest"])
def test_killed_save_leaves_the_previous_checkpoint(tmp_path: Path, point: str) -> None:
    directory, reference = tmp_path / "checkpoints", tmp_path / "reference.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    env["MASTER_PORT"] = str(int(os.environ["MASTER_PORT"]) + 1)
    result = subprocess.run(
        [sys.executable, str(HERE / "crash_driver.py"), str(directory), point, str(reference)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == -signal.SIGKILL, f"the driver was not killed:\n{result.stdout}\n{result.stderr}"

    model = tiny_model()
    engine, *_ = meft_ds.initialize(model=model, config=CONFIG)
    load_path, _ = engine.load_checkpoint(str(directory))
    assert load_path is not None and engine.global_steps == 2
    saved = torch.load(reference)
    for adapter in meft_ds.adapters(model):
        assert torch.equal(adapter.store.rows, saved[adapter.layer_index])
