"""The launcher's arguments and errors, without a training run: each bad input refused in one line before the model
loads, the options' defaults, the log's format and the process groups closed at the end."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch_scripts import launch_script
from launcher_support import LAUNCH_ENV, ROOT, free_port
from tiny_models import tiny_model

import meft_ds
from meft_ds.data import load_examples, split_off
from meft_ds.training import UsageError

pytestmark = pytest.mark.slow  # (some start launch/train.py or launch/evaluate.py in a process of their own)


def test_evaluate_refuses_a_folder_without_an_adapter_in_one_line(tmp_path: Path) -> None:
    command = [sys.executable, "launch/evaluate.py", "--adapter", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, env=LAUNCH_ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path}: no exported meft adapter here (expected adapter_config.json and "
        "adapter_model.safetensors, or adapter_model.safetensors.index.json and its files). Fix: point at the "
        "--output_dir of a finished run, or a folder written by meft_ds.save_adapter, MeftModel.save_pretrained or "
        "MeftTrainer.save_model."
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--meft", "top_k=100000"], "error: meft.top_k: 100000 is larger than num_neurons"),
        (["--meft", "prefetch_layers=1", "--activation_checkpointing"], "error: meft.prefetch_layers: 1 pre-retrieves"),
        (["--train_limit", "0"], "train.py: error: --train_limit 0: use >= 1, or 0 with --rehearsal N"),
        (["--meft", "num_neurons"], "error: --meft 'num_neurons': expected KEY=VALUE. Fix: e.g. --meft num_neurons="),
        (
            ["--dataset", "tests/data/qa.jsonl", "--eval_dataset", "tests/data/qa.jsonl", "--eval_split", "test"],
            "error: tests/data/qa.jsonl: a split or config name (--dataset_split, --eval_split, --dataset_config)",
        ),
    ],
    ids=["top_k", "prefetch with checkpointing", "no training examples", "override without a value", "split of a file"],
)
def test_bad_input_fails_fast_with_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    command = [sys.executable, "launch/train.py", *args, "--output_dir", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, env=LAUNCH_ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(message)
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--adapter_neurons", "0", "--method", "parallel_adapter"], "--adapter_neurons must be at least 1, got 0"),
        (["--max_new_tokens", "0"], "--max_new_tokens must be at least 1, got 0"),
        (["--learning_rate", "-1"], "--learning_rate must be >= 0, got -1.0"),
        (["--weight_decay", "-0.1"], "--weight_decay must be >= 0, got -0.1"),
        (["--eval_limit", "-1"], "--eval_limit must be >= 0, got -1"),
        (["--lora_r", "8"], "--lora_r applies to --method lora, not meft: drop it"),
        (["--adapter_neurons", "64", "--method", "lora"], "--adapter_neurons applies to --method parallel_adapter"),
        (["--lora_targets", "all-linear"], "--lora_targets applies to --method lora, not meft: drop it"),
        (["--num_epochs", "0"], "--num_epochs must be a number > 0, got 0.0"),
        (["--warmup_ratio", "1"], "--warmup_ratio must be in [0, 1), got 1"),
        (["--eval_size", "1.5"], "--eval_size must be a fraction in (0, 1) or a whole count, got 1.5"),
        (["--eval_size", "9", "--eval_dataset", "nq"], "--eval_size holds out part of --dataset's training split, --e"),
        (["--num_epochs", "1", "--max_steps", "5"], "argument --max_steps: not allowed with argument --num_epochs"),
        (["--num_epochs", "1", "--rehearsal", "10"], "--num_epochs with --rehearsal: the rehearsed answers are known"),
        (["--dataset", "facts,,a.jsonl"], "--dataset 'facts,,a.jsonl': an empty name between commas. Fix: join"),
        (["--dataset", "a.jsonl,facts,"], "--dataset 'a.jsonl,facts,': an empty name between commas."),
        (["--dataset", "a.jsonl,b.jsonl", "--facts", "10"], "--facts 10: needs --dataset facts and a multiple of 5"),
        (["--dataset", "facts,nq", "--dataset_format", "qa"], "--dataset_format applies to local files and hub datas"),
        (["--dataset", "facts,a.jsonl", "--dataset_split", "x"], "--dataset_split applies to hub ids and dataset fo"),
    ],
)
def test_an_option_out_of_range_or_for_another_method_is_refused_while_parsing(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each would otherwise fail after the model loaded, or train something other than asked (an ignored --lora_r,
    --adapter_neurons 0 read as "the default size")."""
    parse_args = launch_script("train").parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(args)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].split(": error: ", 1)[1].startswith(message)


def test_evaluate_refuses_an_output_that_is_a_folder_while_parsing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        launch_script("evaluate").parse_args(["--output", str(tmp_path)])
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(f"error: --output {tmp_path} is a folder. Fix: name a JSON file, e.g. {tmp_path / 'scores.json'}.")
    )


def test_an_output_dir_that_cannot_be_made_fails_before_the_model_loads(tmp_path: Path) -> None:
    main = launch_script("train").main

    taken = tmp_path / "a_file"
    taken.write_text("")
    with pytest.raises(UsageError, match=rf"^--output_dir {taken}: cannot create it \(.*File exists"):
        main(["--output_dir", str(taken)])


@pytest.mark.parametrize("method", ["meft", "parallel_adapter"])
def test_an_architecture_without_known_ffns_fails_before_the_model_loads(tmp_path: Path, method: str) -> None:
    """Read from the model's config.json alone (no weights here to load): it failed after loading them."""
    from transformers import OPTConfig

    main = launch_script("train").main

    OPTConfig(hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2).save_pretrained(tmp_path / "opt")
    with pytest.raises(meft_ds.UnsupportedModelError, match=r"model_type 'opt' \(--model .*opt\)"):
        main(["--method", method, "--model", str(tmp_path / "opt"), "--output_dir", str(tmp_path / "run")])


def test_a_dotted_meft_override_sets_one_setting_of_a_section(tmp_path: Path) -> None:
    """``--meft store.shard=false`` over ds_configs/meft_nvme.json keeps the config's NVMe settings (a whole
    ``store={...}`` merges the same way); it was refused as an unknown setting."""
    train = launch_script("train")
    args = train.parse_args(["--deepspeed", "ds_configs/meft_nvme.json", "--meft", "store.shard=false", "--meft",
                             "store.ram_budget_mb=512", "--meft", "top_k=8"])  # fmt: skip
    section = train.build_config(args, tmp_path)["meft"]
    assert section["store"] == {"device": "nvme", "nvme_path": "/local_nvme/meft", "ram_budget_mb": 512, "shard": False}
    assert section["top_k"] == 8 and section["num_neurons"] == 4096


def test_the_demo_s_learning_rate_for_another_model_is_said_to_be_the_demo_s(caplog: pytest.LogCaptureFixture) -> None:
    parse_args = launch_script("train_args").parse_args

    with caplog.at_level(logging.WARNING, logger="meft_ds"):
        assert parse_args([]).learning_rate == parse_args(["--model", "/models/llama"]).learning_rate == 3e-3
        assert parse_args(["--model", "/models/llama", "--learning_rate", "1e-4"]).learning_rate == 1e-4
    assert [r.getMessage() for r in caplog.records] == [
        "--learning_rate: 0.003 is the demo's (the built-in 135M model learning the built-in facts in 100 steps), not "
        "a rate for /models/llama: pass your own (the MEFT paper trained LLaMA-7B at 1e-4)."
    ]


def test_method_options_take_their_defaults_only_for_their_method() -> None:
    parse_args = launch_script("train").parse_args

    assert parse_args(["--method", "lora"]).lora_r == 16
    assert parse_args(["--method", "lora", "--lora_r", "4"]).lora_r == 4
    assert parse_args(["--method", "parallel_adapter", "--meft", "num_neurons=64"]).meft == ["num_neurons=64"]


@pytest.mark.parametrize(("code", "closed"), [(0, True), (1, False)])
def test_a_finished_launcher_closes_its_process_groups(code: int, closed: bool) -> None:
    """run_cli destroys the process groups (the default one and a new one) once main succeeds, before the
    interpreter's teardown, where gloo's threads can abort a finished run; after a failure it leaves them alone."""
    script = (
        "import atexit, torch.distributed as dist\n"
        "from meft_ds.training import run_cli\n"
        "atexit.register(lambda: print('initialized at exit:', dist.is_initialized()))\n"
        "def main():\n"
        "    dist.init_process_group('gloo', rank=0, world_size=1)\n"
        "    dist.new_group([0])\n"
        f"    return {code}\n"
        "run_cli(main)\n"
    )
    env = LAUNCH_ENV | {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == code, result.stderr
    assert f"initialized at exit: {not closed}" in result.stdout


def test_activation_checkpointing_is_refused_for_a_model_without_it() -> None:
    enable_checkpointing = launch_script("train").enable_checkpointing

    with pytest.raises(UsageError, match=r"^--activation_checkpointing: toy \(Linear\) does not support"):
        enable_checkpointing(torch.nn.Linear(2, 2), "toy")
    model = tiny_model().eval()
    enable_checkpointing(model, "tiny")
    assert model.training and model.is_gradient_checkpointing


def test_the_log_names_the_library_once() -> None:
    formatter = launch_script("train").NameOnceFormatter("%(name)s: %(message)s")

    def line(name: str, message: str) -> str:
        return formatter.format(logging.LogRecord(name, logging.WARNING, __file__, 1, message, (), None))

    assert line("meft_ds", "meft_ds: NaN or inf in the row gradients") == "meft_ds: NaN or inf in the row gradients"
    assert line("meft_ds.train", "resumed at step 3") == "meft_ds.train: resumed at step 3"


def test_a_mixture_trains_on_each_source_and_holds_out_part_of_the_first(tmp_path: Path) -> None:
    """--dataset a,b,a: each source's training examples in that order, the first one's --eval_size part held out and
    never trained on, also where it is named again (weighted twice)."""
    task, chats = tmp_path / "qa.jsonl", tmp_path / "chats.jsonl"
    task.write_text("".join(json.dumps({"question": f"Q{n}?", "answers": [f"A{n}"]}) + "\n" for n in range(20)))
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {n}."},
                                                      {"role": "assistant", "content": f"{n}."}]}) + "\n"
                             for n in range(3)))  # fmt: skip
    train_args = launch_script("train_args")
    args = train_args.parse_args(["--dataset", f"{task},{chats},{task}", "--eval_size", "4", "--seed", "3"])
    train, held_out = train_args.load_data(args)
    kept, out = split_off(load_examples(task), 4, seed=3)
    assert held_out == out and train == kept + load_examples(chats) + kept
    args = train_args.parse_args(["--dataset", f"{task},{chats}", "--train_limit", "2", "--eval_dataset", str(chats)])
    assert train_args.load_data(args) == (load_examples(task)[:2] + load_examples(chats)[:2], load_examples(chats))
