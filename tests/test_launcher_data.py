"""The launcher's own held-out part of a dataset (--eval_size) end to end: what it trains on, what it scores, and
``launch/evaluate.py`` scoring the same part again from the run's record."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from launcher_support import EVAL, LAUNCH_ENV, ROOT, TINY_RUN, launch, model_dirs, results, write_config

from meft_ds.data import load_examples, split_off

pytestmark = pytest.mark.slow
__all__ = ["model_dirs"]  # the module-scoped fixture of launcher_support, used here


def test_eval_size_holds_out_part_of_a_file_and_evaluate_scores_that_part_again(
    tmp_path: Path, model_dirs: dict[str, Path]
) -> None:
    data, extra, out = tmp_path / "qa.jsonl", tmp_path / "chats.jsonl", tmp_path / "run"
    data.write_text("".join(json.dumps({"question": e.prompt, "answers": e.answers}) + "\n"
                            for e in load_examples("facts", facts=20)))  # fmt: skip
    # a mixture: another file, of another format (ShareGPT), trained on beside the first, which is the task evaluated
    chats = [{"conversations": [{"from": "human", "value": f"Say {n}."}, {"from": "gpt", "value": f"{n}."}]}
             for n in range(6)]  # fmt: skip
    extra.write_text("".join(json.dumps(chat) + "\n" for chat in chats))
    launch(
        "--deepspeed", write_config(tmp_path), "--model", model_dirs["chat"], "--output_dir", out,
        "--dataset", f"{data},{extra}", "--eval_size", "0.1", "--max_steps", "2", "--no_probe", *EVAL, *TINY_RUN,
        "--seed", "5",
    )  # fmt: skip
    run = results(out)
    # a tenth of the first file, drawn with --seed, is the held-out set (its first 5 scored, EVAL's --eval_limit) and
    # is not trained on (the first 32 of the rest, TINY_RUN's --train_limit), the second file all trained on
    train, held_out = split_off(load_examples(data), 0.1, seed=5)
    assert len(held_out) == 6 and run["eval_size"] == 0.1 and run["train_examples"] == 32 + 6
    scored = [p["prompt"] for p in run["after"]["predictions"]]
    assert scored == [e.prompt for e in held_out[:5]] and not set(scored) & {e.prompt for e in train}
    # launch/evaluate.py draws the same part from the run's record (it refused a file without --eval_dataset)
    command = [sys.executable, "launch/evaluate.py", "--adapter", str(out), "--limit", "5", "--max_new_tokens", "4",
               "--output", str(tmp_path / "eval.json")]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=LAUNCH_ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"held-out set: {data} (--eval_size 0.1 of its training examples, seed 5), 5 examples" in result.stdout
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    for phase in ("before", "after"):
        assert evaluated[phase]["predictions"] == run[phase]["predictions"]
