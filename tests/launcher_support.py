"""What the tests of the real launcher share: a tiny local model, its run settings, and `deepspeed launch/train.py`
run as a user runs it (a free port, no inherited rank) with its outputs read back."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import tiny_model, word_tokenizer

import meft_ds
from meft_ds.data import load_examples
from meft_ds.evaluation import evaluate_generation
from meft_ds.models import load_model_and_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = [
    "--train_limit", "32", "--micro_batch_size", "4", "--learning_rate", "1e-2", "--max_length", "64",
    "--meft", "num_neurons=256", "--meft", "top_k=8", "--seed", "0",
]  # fmt: skip


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random LLaMA saved with a chat-template tokenizer, and the same without a template."""
    folders = {}
    for name, chat in (("chat", True), ("plain", False)):
        folder = tmp_path_factory.mktemp(f"tiny_llama_{name}")
        tiny_model().save_pretrained(folder)
        word_tokenizer(chat=chat).save_pretrained(folder)
        folders[name] = folder
    return folders


def write_config(tmp_path: Path, *, stage: int = 2, offload: bool = True, total_steps: str | int = "auto") -> Path:
    """The shipped config, in fp32 on every CPU: these tests compare runs exactly (ranks, resumes, stores), which
    bf16 (kept on CPUs with native bf16) would blur; bf16 training is tested in test_engine.py."""
    config = json.loads((ROOT / "ds_configs" / "meft.json").read_text())
    config["bf16"] = {"enabled": False}
    config["zero_optimization"] = {"stage": stage}
    if stage and offload:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    config["scheduler"]["params"]["total_num_steps"] = total_steps
    path = tmp_path / f"ds_stage{stage}.json"
    path.write_text(json.dumps(config))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


LAUNCH_ENV = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}


def launcher_command(*args: str | Path, ranks: int = 1, port: int | None = None) -> list[str]:
    return [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
        str(port or free_port()), "launch/train.py", *map(str, args),
    ]  # fmt: skip


def launch(*args: str | Path, ranks: int = 1) -> subprocess.CompletedProcess:
    port = free_port()
    result = subprocess.run(
        launcher_command(*args, ranks=ranks, port=port), cwd=ROOT, env=LAUNCH_ENV, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, f"launcher failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    # DeepSpeed's CPU communication leaves a 67 MB /dev/shm buffer per rank; the engine's set-up removed them
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))
    return result


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


# 5 held-out examples in batches of 2: over 2 ranks, rank 0 generates batches 0 and 2, rank 1 batch 1 (and, where
# forwards run collectives, a filler batch)
EVAL = ["--eval_limit", "5", "--eval_batch_size", "2", "--max_new_tokens", "4"]


def results(output_dir: Path) -> dict:
    return json.loads((output_dir / "results.json").read_text())


def one_process_evaluation(model_dir: Path, adapter: Path | None = None) -> dict:
    """What one process scores (train.py's held-out set and EVAL's settings, fp32): the base model, or with the
    adapter a run exported."""
    model, tokenizer = load_model_and_tokenizer(str(model_dir))
    if adapter is not None:
        meft_ds.load_adapter(model, adapter)
    examples = load_examples("facts", "eval", limit=5, seed=0)
    return evaluate_generation(model, tokenizer, examples, max_new_tokens=4, batch_size=2)
