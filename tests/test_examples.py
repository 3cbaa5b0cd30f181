"""The README's "Use it in your training code" examples: each code block is its file under launch/examples/, verbatim,
and each file runs under its launcher on a tiny local model, learns, checkpoints, and resumes to the same result."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_model, word_tokenizer

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "launch" / "examples"
README_BLOCK = re.compile(r"\[`(launch/examples/[^`]+)`\]\(\1\):\n\n```(?:python|yaml)\n(.*?)```", re.DOTALL)
TINY = ["--max_steps", "6", "--save_steps", "3", "--learning_rate", "1e-2"]
HF_TINY = ["--deepspeed", "ds_configs/meft.json", "--per_device_train_batch_size", "4", "--logging_steps", "1"]
HF_TINY += ["--report_to", "none", "--disable_tqdm", "true"]


def test_readme_shows_every_example_file_verbatim() -> None:
    shown = dict(README_BLOCK.findall((ROOT / "README.md").read_text()))
    assert sorted(shown) == sorted(str(p.relative_to(ROOT)) for p in EXAMPLES.iterdir() if p.is_file())
    for path, block in shown.items():
        assert block == (ROOT / path).read_text(), f"README's block for {path} differs from the file"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working folder with a tiny LLaMA + tokenizer in ``tiny/`` and the repository's ``ds_configs`` and ``launch``
    linked in, so the examples' relative paths work and what they write (e.g. TensorBoard's runs/) stays here."""
    folder = tmp_path_factory.mktemp("examples")
    tiny_model().save_pretrained(folder / "tiny")
    word_tokenizer(chat=True).save_pretrained(folder / "tiny")
    for name in ("ds_configs", "launch"):
        (folder / name).symlink_to(ROOT / name)
    return folder


def free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def launcher(example: str) -> list[str]:
    if example == "accelerate_loop.py":
        accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", free_port()]
        return [*accelerate, "--config_file", "launch/examples/accelerate.yaml"]
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", free_port()]


def run(run_dir: Path, example: str, output_dir: str, *extra: str) -> list[float]:
    """Run an example; its per-step losses (printed, or from the HF Trainer's state)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    arguments = [*TINY, *(HF_TINY if example == "hf_trainer.py" else [])]
    command = [*launcher(example), f"launch/examples/{example}", "--model", "tiny", "--output_dir", output_dir]
    result = subprocess.run(
        [*command, *arguments, *extra], cwd=run_dir, env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, f"{example} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    if example == "hf_trainer.py":
        state = json.loads((run_dir / output_dir / "checkpoint-6" / "trainer_state.json").read_text())
        return [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    return [float(line.split()[-1]) for line in result.stdout.splitlines() if re.fullmatch(r"step \d+ loss \S+", line)]


@pytest.mark.slow
@pytest.mark.parametrize("example", ["deepspeed_loop.py", "hf_trainer.py", "accelerate_loop.py"])
def test_example_learns_checkpoints_and_resumes_the_same_run(run_dir: Path, example: str) -> None:
    name = example.removesuffix(".py")
    losses = run(run_dir, example, f"{name}-straight")
    resumed = run(run_dir, example, f"{name}-resumed", "--resume_from_checkpoint", f"{name}-straight/checkpoint-3")
    assert len(losses) == 6 and sum(losses[3:]) < sum(losses[:3])
    assert resumed[-3:] == losses[3:]  # the HF Trainer's resumed history also holds steps 1-3, from the checkpoint
    store = load_file(str(run_dir / f"{name}-straight" / "adapter_model.safetensors"))
    assert all(torch.count_nonzero(values) for key, values in store.items() if key.endswith(".values"))  # from 0
    for key, tensor in load_file(str(run_dir / f"{name}-resumed" / "adapter_model.safetensors")).items():
        assert torch.equal(tensor, store[key]), key
