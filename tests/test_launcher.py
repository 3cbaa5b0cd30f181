"""The real launcher: `deepspeed launch/train.py` on a tiny local model, 1 and 2 ranks, ZeRO 0/1/2, resume; the
evaluation shared out over 2 ranks scores what one process scores."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch
from launch_scripts import launch_script
from launcher_support import (
    EVAL,
    LAUNCH_ENV,
    ROOT,
    TINY_RUN,
    launch,
    launcher_command,
    metrics,
    model_dirs,
    one_process_evaluation,
    results,
    write_config,
)
from tiny_models import tiny_model, token_batch
from transformers import AutoTokenizer

import meft_ds
from meft_ds.data import IGNORE_INDEX, load_examples, tokenize_for_training
from meft_ds.ds_config import DTYPE_NAMES, cpu_has_amx_bf16
from meft_ds.rehearsal import QUESTIONS as REHEARSAL
from meft_ds.training import UsageError

pytestmark = pytest.mark.slow
__all__ = ["model_dirs"]  # the module-scoped fixture of launcher_support, used here


def test_one_rank_trains_evaluates_exports_and_logs(tmp_path: Path, model_dirs: dict[str, Path]) -> None:
    out = tmp_path / "run"
    launch(
        "--deepspeed", ROOT / "ds_configs" / "meft.json", "--model", model_dirs["chat"], "--output_dir", out,
        "--max_steps", "8", "--eval_limit", "8", "--max_new_tokens", "4", *TINY_RUN, "--facts", "40", "--seed", "2",
        "--eval_steps", "3",
    )  # fmt: skip
    records = metrics(out)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [r["step"] for r in records if "eval_loss" in r] == [3, 6, 8]  # every 3 steps and at the last
    assert records[-1]["loss"] < records[0]["loss"]
    assert all(r["rows_fetched"] > 0 and r["mb_moved"] > 0 for r in records)
    assert (out / "metrics.csv").read_text().splitlines()[0].startswith("step,loss,lr")
    assert list((out / "tensorboard").rglob("events.out.tfevents.*")), "DeepSpeed's TensorBoard monitor wrote nothing"
    run = results(out)
    assert 0.0 <= run["before"]["exact_match"] <= 1.0 and 0.0 <= run["after"]["exact_match"] <= 1.0
    # the shipped config's bf16 "auto" computes in bf16 on a CPU with AMX and in fp32 on others (the faster on each),
    # the model loaded in it
    assert run["dtype"] == ("bf16" if cpu_has_amx_bf16() else "fp32")
    assert run["kept_freed_host_memory"] == (platform.libc_ver()[0] == "glibc")  # MEFT on the CPU: host_memory.py
    assert (out / "checkpoints" / "latest").read_text() == "global_step8"

    trained = meft_ds.load_adapter(tiny_model(), out)
    batch = token_batch(batch=1, length=8)
    with torch.no_grad():
        assert not torch.allclose(trained(batch).logits, tiny_model()(batch).logits)
    assert torch.count_nonzero(meft_ds.adapters(trained)[0].store.values) > 0
    # the last eval_loss: the trained model's loss per answer token on the 8 held-out questions, one at a time, in
    # the run's dtype
    trained.to({name: dtype for dtype, name in DTYPE_NAMES.items()}[run["dtype"]])
    tokenizer = AutoTokenizer.from_pretrained(model_dirs["chat"])
    held_out = tokenize_for_training(load_examples("facts", "eval", facts=40, seed=2, limit=8), tokenizer, 64)
    summed, tokens = 0.0, 0
    with torch.no_grad():
        for feature in held_out:
            answer_tokens = sum(label != IGNORE_INDEX for label in feature["labels"][1:])
            ids, labels = (torch.tensor([feature[key]]) for key in ("input_ids", "labels"))
            summed += trained(input_ids=ids, labels=labels).loss.item() * answer_tokens
            tokens += answer_tokens
    assert records[-1]["eval_loss"] == pytest.approx(summed / tokens, rel=1e-5)

    # launch/evaluate.py on the exported adapter scores exactly what the run scored before and after training (in the
    # run's dtype, on its held-out questions: its facts set's size and seed; its "before" has no adapters: the run's,
    # with adapters fresh from inject, is the base model's)
    command = [
        sys.executable, "launch/evaluate.py", "--model", str(model_dirs["chat"]), "--adapter", str(out),
        "--limit", "8", "--max_new_tokens", "4", "--output", str(tmp_path / "eval.json"),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=LAUNCH_ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert (evaluated["dtype"], evaluated["facts"], evaluated["seed"]) == (run["dtype"], 40, 2)
    for phase in ("before", "after"):
        assert evaluated[phase]["predictions"] == run[phase]["predictions"]
        assert evaluated[phase]["exact_match"] == run[phase]["exact_match"]
    assert "before (base model): exact_match" in result.stdout


@pytest.mark.parametrize(("stage", "offload", "update_rows"), [(0, False, 0), (1, True, 16)])
def test_zero_stages_0_and_1_with_a_model_without_chat_template(
    tmp_path: Path, model_dirs: dict[str, Path], stage: int, offload: bool, update_rows: int
) -> None:
    """ZeRO-0 trains on plain text (continued pretraining) from a dataset folder for --num_epochs, scored by its
    held-out split's loss; ZeRO-1 with meft.update_rows on the facts, on a cosine schedule."""
    out, texts = tmp_path / "run", tmp_path / "texts"  # a dataset folder, as the hub's: a parquet file per split
    facts = [f"{e.prompt} {e.answers[0]}." for e in load_examples("facts")]
    documents = [{"text": " ".join(facts[i : i + 8])} for i in range(0, 320, 8)]  # each over --max_length 64
    texts.mkdir()
    datasets.Dataset.from_list(documents).to_parquet(texts / "train.parquet")
    datasets.Dataset.from_list(documents[:8]).to_parquet(texts / "validation.parquet")  # trained on: the loss falls
    data = ["--dataset", texts, "--eval_split", "validation", "--no_probe"] if stage == 0 else []
    length = (
        ["--num_epochs", "0.75"] if data else ["--max_steps", "6", "--lr_scheduler", "cosine", "--warmup_ratio", "0.5"]
    )
    launch(
        "--deepspeed", write_config(tmp_path, stage=stage, offload=offload), "--model", model_dirs["plain"],
        "--output_dir", out, *length, *(data or ["--no_eval"]), *TINY_RUN,
        "--meft", f"update_rows={update_rows}", *(["--rehearsal", "3"] if update_rows else []),
    )  # fmt: skip
    records, run = metrics(out), results(out)
    assert len(records) == run["steps"] and records[-1]["loss"] < records[0]["loss"]
    assert records[-1]["epoch"] == run["epochs"] == pytest.approx(run["steps"] * 4 / run["train_examples"], abs=1e-4)
    if not data:  # --lr_scheduler cosine: DeepSpeed's WarmupCosineLR, 3 of the 6 steps warming up, then to its floor
        cosine = [1e-4 + (1 - 1e-4) * (1 + math.cos(math.pi * k / 3)) / 2 for k in (1, 2)]
        expected = [0.0, 0.0, 1e-2 / 3, 2e-2 / 3, *(1e-2 * c for c in cosine)]
        assert [r["lr"] for r in records] == pytest.approx(expected) and run["lr_scheduler"] == "WarmupCosineLR"
    if data:
        assert run["train_examples"] > 32  # windows of the first 32 texts
        # 3/4 of a pass in batches of 4 (TINY_RUN), and a schedule over those steps: DeepSpeed's warmup (at least 2
        # steps, from its minimum 0 before the first) reaches the peak learning rate at step 4, then decays towards 0
        assert run["steps"] == math.ceil(0.75 * run["train_examples"] / 4) and run["num_epochs"] == 0.75
        lrs = [r["lr"] for r in records]
        assert lrs[:4] == [0.0, 0.0, pytest.approx(5e-3), pytest.approx(1e-2)] and 0 < lrs[-1] < lrs[-2]
        assert run["after"]["loss"] < run["before"]["loss"]
        assert run["after"]["perplexity"] == pytest.approx(math.exp(run["after"]["loss"]))
        # launch/evaluate.py scores the export on the run's held-out split, in the run's windows (--max_length 64)
        command = [sys.executable, "launch/evaluate.py", "--adapter", str(out), "--output", str(out / "e.json")]
        result = subprocess.run(command, cwd=ROOT, env=LAUNCH_ENV, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-4000:]
        evaluated = json.loads((out / "e.json").read_text())
        for phase in ("before", "after"):
            assert evaluated[phase]["loss"] == pytest.approx(run[phase]["loss"], rel=1e-5)
    # meft.update_rows: the first 80 general questions (answered by the base model, once) read as background, right or
    # not (not the 32 dates added later: the measured TF-IDF runs stand); of the first 3 (--rehearsal 3) only those
    # answered right would be trained on, and the random tiny model answers none right; each step updates at most
    # update_rows rows per layer (2 layers) of the hundreds it touches
    assert run["background_documents"] == (80 if update_rows else 0) and len(REHEARSAL) == 112
    assert run["rehearsal"] == [] and run["rehearsal_answers"] == ("right" if update_rows else None)
    updated = [r["rows_updated"] for r in records]
    assert max(updated) <= 2 * update_rows if update_rows else min(updated) > 2 * 16


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory, model_dirs: dict[str, Path]) -> dict:
    """A 2-rank run with replicated stores (6 steps, the held-out evaluation shared out): what the 1-rank run with
    double accumulation and the sharded run are compared with. Its arguments, output folder and launcher result."""
    tmp_path = tmp_path_factory.mktemp("two_ranks")
    config = write_config(tmp_path, total_steps=6)
    common = [
        "--deepspeed", config, "--model", model_dirs["chat"], "--max_steps", "6", "--eval_steps", "3", *EVAL, *TINY_RUN,
    ]  # fmt: skip
    out = tmp_path / "replicated"
    result = launch(*common, "--output_dir", out, "--meft", 'store={"shard": false}', ranks=2)
    return {"common": common, "out": out, "result": result}


def test_two_ranks_match_one_rank_with_double_accumulation(tmp_path: Path, model_dirs: dict[str, Path],
                                                           two_ranks: dict) -> None:  # fmt: skip
    two_dir, two = two_ranks["out"], two_ranks["result"]
    launch(*two_ranks["common"], "--output_dir", tmp_path / "one", "--gradient_accumulation_steps", "2")
    digests = {line.split("digest ")[1].split()[0] for line in two.stderr.splitlines() if "digest" in line}
    assert len(digests) == 1, f"both ranks must log the same store digest, got {digests}"
    two_losses = [r["loss"] for r in metrics(two_dir)]
    one_losses = [r["loss"] for r in metrics(tmp_path / "one")]
    assert two_losses == pytest.approx(one_losses, rel=1e-4)
    # the held-out loss shared out over the ranks: what one process computes
    two_eval, one_eval = ([r.get("eval_loss") for r in metrics(out)] for out in (two_dir, tmp_path / "one"))
    assert two_eval == pytest.approx(one_eval, rel=1e-4) and two_eval[2] is not None and two_eval[5] is not None
    assert all(r["rows_fetched"] > 0 for r in metrics(two_dir))
    a = meft_ds.load_adapter(tiny_model(), two_dir)
    b = meft_ds.load_adapter(tiny_model(), tmp_path / "one")
    for x, y in zip(meft_ds.adapters(a), meft_ds.adapters(b), strict=True):
        torch.testing.assert_close(x.store.rows, y.store.rows, rtol=0, atol=1e-5)
    # the 2 ranks shared the evaluation out (each generated its batches) and scored what one process scores
    for rank, answers in ((0, 3), (1, 2)):
        assert two.stderr.count(f"rank {rank} of 2: generated {answers} of 5 held-out answers\n") == 2  # before, after
    assert results(two_dir)["before"] == results(tmp_path / "one")["before"]
    assert results(two_dir)["before"] == one_process_evaluation(model_dirs["chat"])
    assert results(two_dir)["after"] == one_process_evaluation(model_dirs["chat"], two_dir)


def store_bytes_per_rank(result: subprocess.CompletedProcess) -> list[int]:
    return [int(line.split("holds ")[1].split()[0]) for line in result.stderr.splitlines() if "row store holds" in line]


def test_sharded_store_trains_like_the_replicated_one_with_half_the_memory(
    tmp_path: Path, model_dirs: dict[str, Path], two_ranks: dict
) -> None:
    common, replicated_dir = two_ranks["common"], two_ranks["out"]
    sharded = launch(*common, "--output_dir", tmp_path / "sharded", "--meft", 'store={"shard": true}', ranks=2)
    for key in ("loss", "eval_loss"):  # eval_loss: in lockstep, a sharded store's forwards run collectives
        assert [r.get(key) for r in metrics(tmp_path / "sharded")] == pytest.approx(
            [r.get(key) for r in metrics(replicated_dir)], rel=1e-5
        )
    full, halves = store_bytes_per_rank(two_ranks["result"]), store_bytes_per_rank(sharded)
    assert len(full) == len(halves) == 2 and halves[0] + halves[1] == full[0] and halves[0] == halves[1]
    a = meft_ds.load_adapter(tiny_model(), replicated_dir)
    b = meft_ds.load_adapter(tiny_model(), tmp_path / "sharded")
    for x, y in zip(meft_ds.adapters(a), meft_ds.adapters(b), strict=True):
        torch.testing.assert_close(x.store.rows, y.store.rows, rtol=0, atol=1e-5)
    # the evaluation over 2 ranks in lockstep (a sharded store's forwards run collectives): one process's scores
    assert sharded.stderr.count("rank 1 of 2: generated 2 of 5 held-out answers (in lockstep; filler batches: 1)") == 2
    assert results(tmp_path / "sharded")["before"] == results(replicated_dir)["before"]
    assert results(tmp_path / "sharded")["before"] == one_process_evaluation(model_dirs["chat"])
    assert results(tmp_path / "sharded")["after"] == one_process_evaluation(model_dirs["chat"], tmp_path / "sharded")
    assert results(tmp_path / "sharded")["after"]["n"] == 5

    # a sharded run cut at step 3 and resumed: each rank reloads its own part of the store
    shards = sorted(p.name for p in (tmp_path / "sharded" / "checkpoints" / "global_step6" / "meft").glob("*.safe*"))
    assert shards == [f"layer_{i}.shard_{r}_of_2.safetensors" for i in range(2) for r in range(2)]
    cut = ["--output_dir", tmp_path / "cut", "--meft", 'store={"shard": true}']
    launch(*common, *cut, "--max_steps", "3", "--no_eval", ranks=2)  # the later --max_steps wins
    launch(*common, *cut, "--max_steps", "6", "--no_eval", "--resume", ranks=2)
    assert [r["loss"] for r in metrics(tmp_path / "cut")] == [r["loss"] for r in metrics(tmp_path / "sharded")]
    c = meft_ds.load_adapter(tiny_model(), tmp_path / "cut")
    for x, y in zip(meft_ds.adapters(b), meft_ds.adapters(c), strict=True):
        assert torch.equal(x.store.rows, y.store.rows)


def test_a_run_killed_mid_training_resumes_to_the_same_losses_store_and_routers(
    tmp_path: Path, model_dirs: dict[str, Path]
) -> None:
    """Killed between two checkpoints and resumed to step 10, then the finished run continued to step 12: every
    loss, row and router weight of the run that went straight to 12; of its checkpoints, the two latest are kept."""
    config = write_config(tmp_path, total_steps=12)  # one schedule for the whole run, however it is cut
    common = ["--deepspeed", config, "--model", model_dirs["chat"], "--no_eval", "--save_steps", "4", *TINY_RUN]
    launch(*common, "--output_dir", tmp_path / "straight", "--max_steps", "12", "--save_total_limit", "0")

    cut = tmp_path / "cut"
    command = launcher_command(*common, "--output_dir", cut, "--max_steps", "12")
    process = subprocess.Popen(command, cwd=ROOT, env=LAUNCH_ENV, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 600
    while time.time() < deadline and process.poll() is None:
        if (cut / "metrics.jsonl").exists() and any(r["step"] >= 6 for r in metrics(cut)):
            break
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    written = metrics(cut)
    assert 6 <= written[-1]["step"] < 12, "the kill must land between the step-4 checkpoint and the end"
    assert (cut / "checkpoints" / "latest").read_text() in ("global_step4", "global_step8")

    launch(*common, "--output_dir", cut, "--max_steps", "10", "--resume")
    assert (cut / "checkpoints" / "latest").read_text() == "global_step10", "a run saves its last step"
    launch(*common, "--output_dir", cut, "--max_steps", "12", "--resume")
    assert [r["step"] for r in metrics(cut)] == list(range(1, 13)), "each step logged once after the resumes"
    tags = {
        run: sorted(p.name for p in (tmp_path / run / "checkpoints").glob("global_step*"))
        for run in ("straight", "cut")
    }
    assert tags == {"straight": ["global_step12", "global_step4", "global_step8"],  # --save_total_limit 0: all
                    "cut": ["global_step10", "global_step12"]}, "the two latest only (the default)"  # fmt: skip
    assert [r["loss"] for r in metrics(cut)] == [r["loss"] for r in metrics(tmp_path / "straight")]
    a = meft_ds.load_adapter(tiny_model(), tmp_path / "straight")
    b = meft_ds.load_adapter(tiny_model(), cut)
    for x, y in zip(meft_ds.adapters(a), meft_ds.adapters(b), strict=True):
        assert torch.equal(x.store.rows, y.store.rows)
        assert torch.equal(x.router.weight, y.router.weight)


def test_without_a_launcher_it_runs_as_one_process_and_ctrl_c_says_where_to_resume(
    tmp_path: Path, model_dirs: dict[str, Path]
) -> None:
    """``python launch/train.py`` (no launcher: DeepSpeed looked for MPI and stopped on a missing mpi4py) trains as the
    only rank; SIGINT mid-run ends it with one line naming the checkpoint to resume from, exit code 130."""
    out = tmp_path / "run"
    command = [sys.executable, "launch/train.py", "--model", str(model_dirs["chat"]), "--no_eval", "--output_dir",
               str(out), "--max_steps", "200", "--save_steps", "2", *TINY_RUN]  # fmt: skip
    env = {k: v for k, v in LAUNCH_ENV.items() if k not in ("MASTER_ADDR", "LOCAL_WORLD_SIZE", "LOCAL_SIZE")}
    # SIGINT's default action in the child whatever this process inherited (a disposition of SIG_IGN is inherited,
    # and Python then installs no KeyboardInterrupt handler: the CI run's child trained on to the end)
    process = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.time() + 600
    while time.time() < deadline and process.poll() is None:
        if (out / "metrics.jsonl").exists() and any(r["step"] >= 3 for r in metrics(out)):
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=300)[1]
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    step = int(re.search(r"interrupted at step (\d+)\. ", stderr).group(1))
    latest = (out / "checkpoints" / "latest").read_text()
    saved = int(latest.removeprefix("global_step"))  # the last save, or the one before if the signal cut a save short
    assert 3 <= step < 200 and saved % 2 == 0 and step - 2 <= saved <= step
    assert stderr.strip().splitlines()[-1] == (
        f"interrupted at step {step}. Last checkpoint: {out / 'checkpoints' / latest}; resume with the same command "
        "plus --resume."
    )


def test_a_second_run_into_the_same_output_dir_needs_resume(tmp_path: Path, model_dirs: dict[str, Path]) -> None:
    out = tmp_path / "run"
    common = ["--model", model_dirs["chat"], "--no_eval", "--output_dir", out, "--max_steps", "1", *TINY_RUN]
    launch(*common)
    result = subprocess.run([sys.executable, "launch/train.py", *map(str, common)], cwd=ROOT, env=LAUNCH_ENV,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert (
        result.returncode == 2
        and "error: --output_dir" in result.stderr
        and "already holds a run" in result.stderr
        and "--resume" in result.stderr
    )
    # resuming the finished run: refused before the model loads (it crashed after loading it, training 0 steps)
    with pytest.raises(UsageError, match=rf"^--resume: the run in {out} has reached step 1, and --max_steps is 1: "
                                         "nothing is left to train. Fix: raise --max_steps"):  # fmt: skip
        launch_script("train").main([*map(str, common), "--resume"])
    # --num_epochs: its steps are counted once the examples are tokenized (0.1 of a pass over 32 in batches of 4: 1)
    by_epochs = [*map(str, common[: common.index("--max_steps")]), "--num_epochs", "0.1", "--resume", *TINY_RUN]
    with pytest.raises(UsageError, match=r"has reached step 1, and --num_epochs 0.1 is 1 step: nothing is left to "
                                         "train. Fix: raise --num_epochs"):  # fmt: skip
        launch_script("train").main(by_epochs)
