"""``launch/train.py --method``: one short run of each baseline (LoRA, the dense parallel adapter, full fine-tuning)
through the real launcher, with its trainable values and device bytes counted by hand, its rehearsal, evaluation,
retention probe and export."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import pytest
from launcher_support import EVAL, TINY_RUN, launch, metrics, model_dirs, results, write_config
from safetensors.torch import load_file
from tiny_models import tiny_model

from meft_ds.data import facts_dataset
from meft_ds.probe import probe_examples
from meft_ds.rehearsal import QUESTIONS as REHEARSAL

__all__ = ["model_dirs"]  # the module-scoped fixture of launcher_support, used here

# --method: one short run of each baseline on the tiny LLaMA (d=64, FFN 128, 2 layers), with trainable values and
# device bytes counted by hand: LoRA r=4 on gate/up/down = 4 (64+128) per matrix, 3 per layer; the parallel adapter's
# keys and values 2 x 16 x 64 per layer (LoRA's run with activation checkpointing: the same bytes, activations are
# not training state). MEFT's run through --method meft, checkpointed, with its fetched rows counted, is
# test_quality.py's quick grid; its export, test_one_rank_trains_evaluates_exports_and_logs.
METHODS = {
    "lora": (
        ["--lora_r", "4", "--rehearsal", "3", "--rehearsal_answers", "all", "--activation_checkpointing"],
        2 * 3 * 4 * (64 + 128),
        128 * 4,  # the largest tensor: lora_B of gate_proj / up_proj, lora_A of down_proj
    ),
    "parallel_adapter": (  # the rehearsal-only control (--train_limit 0, no facts), on the distributions
        [
            "--adapter_neurons",
            "16",
            "--rehearsal",
            "2",
            "--rehearsal_answers",
            "all",
            "--rehearsal_target",
            "distribution",
            "--train_limit",
            "0",
        ],
        2 * 2 * 16 * 64,
        16 * 64,  # one layer's keys or values
    ),
    "full": ([], None, None),  # every parameter of the model, the embedding the largest
}
BUCKET = 1000  # elements of DeepSpeed's gradient bucket: 4000 bytes in fp32


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_evaluates_reports_its_device_bytes_and_exports(
    tmp_path: Path, model_dirs: dict[str, Path], method: str
) -> None:
    config = json.loads(write_config(tmp_path).read_text())
    config["zero_optimization"]["reduce_bucket_size"] = BUCKET
    (tmp_path / "ds.json").write_text(json.dumps(config))
    extra, trainable, largest = METHODS[method]
    weights = [p.numel() for p in tiny_model().parameters()]
    trainable, largest = trainable or sum(weights), largest or max(weights)
    out = tmp_path / "run"
    launch(
        "--deepspeed", tmp_path / "ds.json", "--model", model_dirs["chat"], "--output_dir", out, "--method", method,
        "--max_steps", "3", "--facts", "20", "--no_eval_before", *EVAL, *TINY_RUN, *extra,  # extra's --train_limit last
    )  # fmt: skip
    run, records = results(out), metrics(out)
    assert run["method"] == method and len(records) == 3 and all(r["grad_norm"] is not None for r in records)
    assert run["kept_freed_host_memory"] == (method == "meft" and platform.libc_ver()[0] == "glibc")
    # --rehearsal N --rehearsal_answers all: the first N general questions with the base model's answers (the tiny
    # model's are non-empty and wrong) added to the 32 training examples (LoRA's run), or alone (--train_limit 0)
    rehearsed = [(r["question"], bool(r["answer"])) for r in run["rehearsal"]]
    asked = int(extra[extra.index("--rehearsal") + 1]) if "--rehearsal" in extra else 0
    assert rehearsed == [(q, True) for q, _ in REHEARSAL[:asked]]
    assert run["train_examples"] == (0 if "--train_limit" in extra else 32) + len(rehearsed)
    # rehearsing the untrained model's distributions alone starts at its optimum: zero loss (up to rounding), where
    # its own answer tokens cost the random tiny model its cross-entropy
    distribution = "--rehearsal_target" in extra
    assert run["rehearsal_target"] == ("distribution" if distribution else "tokens" if asked else None)
    assert (records[0]["loss"] < 1e-5) == distribution
    assert run["trainable_params"] == trainable
    # fp32, ZeRO-2 with the optimizer offloaded: on the device the trainable weights, the bucket, the one gradient
    # outside it and DeepSpeed's offload buffer of its size (the largest tensor's; the others leave through the bucket)
    device = run["device_training"]
    expected = (trainable + 2 * largest + BUCKET) * 4
    assert device["device_bytes"] == expected == sum(item["nbytes"] for item in device["items"])
    # the held-out set is --facts' (20 facts: 4 people), the probe's questions all asked after training
    held_out = {e.prompt for e in facts_dataset("eval", num_entities=4)}
    assert {p["prompt"] for p in run["after"]["predictions"]} <= held_out
    probe = run["retention"]
    assert probe["known"] == len(probe_examples()) == len(probe["answers"])
    assert probe["still_right"] == sum(answer["right"] for answer in probe["answers"])
    exported = {
        "lora": "adapter_model.safetensors",
        "parallel_adapter": "parallel_adapter.safetensors", "full": "model.safetensors",
    }[method]  # fmt: skip
    tensors = load_file(out / exported)
    trained = [name for name, t in tensors.items() if ("lora_B" in name or "values" in name) and t.abs().sum() > 0]
    assert method == "full" or trained, f"{method}: the exported zero-initialised weights did not move"
