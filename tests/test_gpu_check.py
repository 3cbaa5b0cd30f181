"""launch/gpu_check.sh --dry-run: the GPU check's whole script runs on the CPU at tiny sizes (as CI runs it), and its
benchmark reports every variant (and generate() with routing on the host and on the device, and their agreement) with
the figures BENCHMARKS.md takes from it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "DS_ACCELERATOR")}
    result = subprocess.run(
        ["bash", "launch/gpu_check.sh", "--dry-run"], cwd=ROOT, env={**env, "OUT": str(tmp_path)},
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in (tmp_path / "tests.log").read_text()
    summary = (tmp_path / "summary.txt").read_text()  # every step ran, each with its exit code
    assert [line.split(":")[0] for line in summary.splitlines()] == ["environment", "build", "tests", "bench"]
    assert all(": exit 0," in line for line in summary.splitlines())
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    variants = [r["variant"] for r in report["results"]]
    assert [v.split(" ")[0] for v in variants] == ["no", "LoRA", "MEFT"]
    meft = report["results"][-1]
    assert meft["bytes_to_device_per_step"] > 0 and meft["bytes_to_host_per_step"] > 0
    assert meft["device_wait_ms_per_layer"]["calls"] == report["accumulation"] * 2 * (report["timed_steps"] + 1)
    assert all(r["tokens_per_s"] > 0 and r["peak_device_gib"] > 0 for r in report["results"])
    host = meft["host_timeline"]  # where MEFT's host time goes, as benchmark c. splits it on the CPU
    assert host["steps"] == report["accumulation"] * report["timed_steps"] and host["layers"] == 2
    assert host["seconds"]["routing (score + top-K)"] > 0 and host["seconds"]["sparse step: update"] > 0
    generated = report["generation"]  # the trained MEFT model's generate(), routing on the host, then on the device
    assert generated["identical"] and [p["path"] for p in generated["paths"]] == ["host", "device"]
    host, device = generated["paths"]
    assert host["bytes_to_host_per_token"] > 0 and device["bytes_to_host_per_token"] == 0
    assert device["bytes_to_device_per_token"] == 0 and device["row_device_bytes"] > 0
    assert generated["speedup"] == device["tokens_per_s"] / host["tokens_per_s"] > 0
    # both paths' routing on identical inputs, layer by layer: the same rows; in fp32 the same outputs up to rounding
    agreement = generated["routing_agreement"]
    for a in agreement.values():
        assert a["layers"] == 2 and a["min_tokens_same_rows"] == a["min_rows_shared"] == 1.0
    fp32 = agreement["float32"]
    assert fp32["max_output_rel_diff"] < 1e-5 and fp32["next_token_logits_rel_diff"] < 1e-5
    table = (tmp_path / "gpu_bench.md").read_text()
    assert all(v in table for v in variants) and "dry run" in table and "meft_ds.for_inference" in table
    assert "meft_ds host work, all phases" in table
