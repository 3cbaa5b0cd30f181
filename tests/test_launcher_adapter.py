"""`launch/train.py --adapter DIR`: a run that starts from an exported adapter (a second stage of fine-tuning), with
the export's layers and settings, its rows and routers, and the checks that refuse a mismatch before the model
loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from launch_scripts import launch_script
from launcher_support import launch, model_dirs, write_config
from safetensors.torch import load_file
from tiny_models import tiny_model

import meft_ds
from meft_ds import CheckpointError
from meft_ds.training import UsageError

__all__ = ["model_dirs"]  # the module-scoped fixture of launcher_support, used here
EXPORTED = {"num_neurons": 128, "top_k": 4, "layers": [1], "seed": 5}  # none of them the config's or TINY_RUN's


def export(folder: Path, base: Path) -> Path:
    """An adapter with values and routers unlike a fresh one's, exported with ``base`` as its base model."""
    model = meft_ds.inject(tiny_model(), EXPORTED)
    generator = torch.Generator().manual_seed(0)
    for adapter in meft_ds.adapters(model):
        adapter.store.rows[:, 1].normal_(std=0.02, generator=generator)
        with torch.no_grad():
            adapter.router.weight.normal_(generator=generator)
    meft_ds.save_adapter(model, folder, base_model_name_or_path=str(base))
    return folder


def test_a_run_starts_from_the_export_s_settings_rows_and_routers(tmp_path: Path, model_dirs: dict[str, Path]) -> None:
    """At learning rate 0 the run's own export is its starting adapter, to the bit: the rows came from the export,
    and so did the routers through DeepSpeed (whose copy of the weights, taken as the engine is built, the step writes
    back). --model defaults to the export's base model."""
    start, out = export(tmp_path / "start", model_dirs["chat"]), tmp_path / "run"
    launch(
        "--deepspeed", write_config(tmp_path), "--adapter", start, "--output_dir", out, "--max_steps", "2",
        "--no_eval", "--train_limit", "16", "--micro_batch_size", "4", "--max_length", "64", "--learning_rate", "0",
    )  # fmt: skip
    run = json.loads((out / "results.json").read_text())
    assert run["model"] == str(model_dirs["chat"]) and run["adapter"] == str(start)
    assert {key: run["meft"][key] for key in ("num_neurons", "top_k", "layers")} == {
        key: EXPORTED[key] for key in ("num_neurons", "top_k", "layers")
    }
    assert run["stats"]["rows_fetched"] > 0
    before, after = load_file(start / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[name], after[name]) for name in before)


def test_settings_or_a_model_that_disagree_with_the_export_are_refused_before_it_loads(
    tmp_path: Path, model_dirs: dict[str, Path]
) -> None:
    train = launch_script("train")
    start = export(tmp_path / "start", model_dirs["chat"])
    args = train.parse_args(["--adapter", str(start), "--meft", "top_k=8"])
    with pytest.raises(UsageError, match=r"^--meft top_k=8: the adapter in .* has top_k=4\. Fix: drop the override"):
        train.build_config(args, tmp_path)
    args = train.parse_args(["--adapter", str(start), "--meft", "top_k=4", "--model", "smollm2-135m-instruct"])
    mismatch = r"start: the adapter was trained for hidden size 64 \(llama\), this model has 576 \(llama\)\. Fix: "
    with pytest.raises(CheckpointError, match=mismatch):
        train.build_config(args, tmp_path)
    with pytest.raises(SystemExit):  # (the message: test_launcher's parsing tests)
        train.parse_args(["--adapter", str(start), "--method", "lora"])
    assert train.parse_args([]).model == "smollm2-135m-instruct"  # without --adapter: the built-in model
