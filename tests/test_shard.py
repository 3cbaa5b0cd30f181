"""The sharded row store, across 2 real processes (torchrun, gloo); MeftTrainer's save_model gathers it; a plain
loop of 2 ranks (tests/ddp_driver.py), also with FSDP (tests/fsdp_driver.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
pytestmark = pytest.mark.slow


def run_driver(driver: str, *args: str) -> None:
    """``driver`` on 2 ranks (torchrun, a free port); it must end with every rank's "OK"."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
        str(HERE / driver), *args,
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    assert "rank 0: OK" in result.stdout and "rank 1: OK" in result.stdout


def test_sharded_store_operations_equal_the_replicated_store_and_the_trainer_saves_it_whole(tmp_path: Path) -> None:
    run_driver("shard_driver.py", str(tmp_path))


def test_a_plain_loop_of_several_ranks_must_average_the_rows_gradients() -> None:
    run_driver("ddp_driver.py")


def test_a_plain_loop_with_fsdp_trains_as_with_ddp() -> None:
    run_driver("fsdp_driver.py")
