"""Fuzzing the input edges: random malformed meft sections, DeepSpeed configs and dataset rows must end in one of
meft_ds's own clear errors (or load), never in a traceback from deep inside Python, torch or DeepSpeed."""

from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path
from typing import Any

from meft_ds import MeftConfig, MeftConfigError
from meft_ds.data import DatasetError, load_examples
from meft_ds.ds_config import resolve_auto, validate_deepspeed_config

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"
NASTY: list[Any] = [
    None, True, False, 0, -1, 1, 3, 7, 64, 4096, 10**12, 0.5, -0.0, 1e-300, math.nan, math.inf, -math.inf, "", "auto",
    "64", "logit", "bf16", [], [0], [0, 1], [-1, 99], [0.9, 0.999], [0.9, 1.5], ["a"], {}, {"x": 1}, "\u00e9\u4e2d",
]  # fmt: skip
CASES = 2000


def mutate(value: Any, rng: random.Random, depth: int = 0) -> Any:
    """``value`` with one random leaf replaced, deleted or given a stray key."""
    if isinstance(value, dict) and value and depth < 4:
        key = rng.choice(sorted(value))
        out = dict(value)
        roll = rng.random()
        if roll < 0.15:
            del out[key]
        elif roll < 0.25:
            out[rng.choice(["extra", "top_kk", "stage"])] = rng.choice(NASTY)
        elif roll < 0.4:
            out[key] = copy.deepcopy(rng.choice(NASTY))  # a whole sub-object replaced
        else:
            out[key] = mutate(value[key], rng, depth + 1)
        return out
    if isinstance(value, list) and value and rng.random() < 0.5:
        out = list(value)
        index = rng.randrange(len(out))
        out[index] = mutate(value[index], rng, depth + 1) if rng.random() < 0.5 else rng.choice(NASTY)  # (a turn's)
        return out
    return copy.deepcopy(rng.choice(NASTY))


def test_random_meft_sections_give_clean_errors() -> None:
    rng = random.Random(0)
    valid = MeftConfig(num_neurons=256, top_k=8).to_dict()
    accepted = 0
    for _ in range(CASES):
        section = mutate(valid, rng)
        try:
            MeftConfig.from_dict(section)
            accepted += 1
        except MeftConfigError as error:
            assert str(error).startswith("meft") and "Fix:" in str(error), str(error)
    assert 0 < accepted < CASES, "the fuzzer must produce both valid and invalid sections"


def test_random_deepspeed_configs_give_clean_errors() -> None:
    rng = random.Random(1)
    base = json.loads((ROOT / "ds_configs" / "meft.json").read_text())
    accepted = 0
    for _ in range(CASES):
        config = mutate(base, rng)
        if not isinstance(config, dict):
            continue
        try:
            validate_deepspeed_config(resolve_auto(config, max_steps=10))
            MeftConfig.from_dict(config.get("meft"))
            accepted += 1
        except MeftConfigError as error:
            assert "Fix:" in str(error), str(error)
    assert accepted > 0


def test_random_dataset_rows_give_clean_errors(tmp_path: Path) -> None:
    rng = random.Random(2)
    rows = {name: json.loads((DATA / f"{name}.jsonl").read_text().splitlines()[0]) for name in ("qa", "nq", "gsm8k")}
    rows["squad"] = json.loads((DATA / "squad.json").read_text())[0]
    rows["toolbench"] = json.loads((DATA / "toolbench.json").read_text())[0]
    rows["alpaca"] = json.loads((DATA / "alpaca.json").read_text())[0]
    rows["messages"] = json.loads((DATA / "messages.jsonl").read_text().splitlines()[0])
    rows["sharegpt"] = json.loads((DATA / "sharegpt.jsonl").read_text().splitlines()[0])
    rows["prompt_completion"] = json.loads((DATA / "prompt_completion.jsonl").read_text().splitlines()[1])  # as turns
    rows["text"] = json.loads((DATA / "text.jsonl").read_text().splitlines()[0])
    path = tmp_path / "rows.jsonl"
    loaded = 0
    for case in range(CASES):
        fmt = rng.choice(sorted(rows))
        broken = mutate(rows[fmt], rng)
        path.write_text(json.dumps(rows[fmt]) + "\n" + json.dumps(broken) + "\n")
        try:
            load_examples(path, format=rng.choice([fmt, None]))
            loaded += 1
        except DatasetError as error:
            message = str(error)
            assert "rows.jsonl" in message, f"case {case}: the error must name the file: {message}"
    assert 0 < loaded < CASES
