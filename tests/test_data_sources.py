"""Data sources: local files of every schema, one clear error per bad row, the hub and dataset folders through
``datasets.load_dataset``, and a held-out part split off a training split (--eval_size)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import pytest

from meft_ds.data import DATASETS, DatasetError, Example, load_examples, split_off

DATA = Path(__file__).parent / "data"

# ----------------------------------------------------------------------------------------------------------------
# local files

SCHEMA_FILES = [
    ("qa.jsonl", "qa", "Who wrote the play Hamlet?", ["William Shakespeare", "Shakespeare"]),
    ("nq.jsonl", "nq", "where is the eiffel tower located", ["Paris", "Paris, France"]),
    ("squad.json", "squad", "Which NFL team represented the AFC at Super Bowl 50?", ["Denver Broncos"]),
    (
        "toolbench.json",
        "toolbench",
        "I need a love quote and a success quote for my wedding speech.",
        ["Olato Quotes.Love Quote; Olato Quotes.Success Quote"],
    ),
    ("gsm8k.jsonl", "gsm8k", "Natalia sold clips", None),
    ("messages.jsonl", "messages", "And of Italy?", ["Rome"]),
    ("sharegpt.jsonl", "sharegpt", "And of Italy?", ["Rome"]),
    ("prompt_completion.jsonl", "prompt_completion", "Who wrote the play Hamlet?", ["William Shakespeare"]),
    ("alpaca.json", "alpaca", "Give the capital of the country.\n\nItaly", ["Rome"]),
    (
        "text.jsonl",
        "text",
        "",
        ["The Eiffel Tower is a wrought-iron lattice tower in Paris, completed in 1889 for the World's Fair."],
    ),
]


@pytest.mark.parametrize(("file", "fmt", "prompt", "answers"), SCHEMA_FILES)
@pytest.mark.parametrize("inferred", [True, False])
def test_every_local_schema_loads(file: str, fmt: str, prompt: str, answers: list[str] | None, inferred: bool) -> None:
    examples = load_examples(DATA / file, format=None if inferred else fmt)
    task = {"toolbench": "toolbench", "gsm8k": "gsm8k", "text": "text"}.get(fmt, "qa")
    assert len(examples) == 2 and all(e.task == task and e.context is None for e in examples)
    assert examples[0].prompt.startswith(prompt)
    if answers is not None:
        assert examples[0].answers == answers
    assert examples[0].answers[0].strip()


def test_gsm8k_target_is_the_whole_solution() -> None:
    (example,) = load_examples(DATA / "gsm8k.jsonl", limit=1)
    assert example.answers[0].startswith("Natalia sold 48/2") and example.answers[0].endswith("#### 72")


def test_a_sharegpt_conversation_is_the_same_example_as_its_messages_form() -> None:
    """FastChat's human/gpt speakers as the user and assistant roles: every turn learned, the last one scored."""
    assert load_examples(DATA / "sharegpt.jsonl") == load_examples(DATA / "messages.jsonl")


def test_an_alpaca_row_without_input_asks_its_instruction() -> None:
    with_input, without = load_examples(DATA / "alpaca.json")
    assert with_input.prompt.endswith("\n\nItaly") and without.prompt == "Who wrote the play Hamlet?"


def test_squad_is_closed_book_unless_asked() -> None:
    (closed,) = load_examples(str(DATA / "squad.json"), limit=1)
    (opened,) = load_examples(str(DATA / "squad.json"), limit=1, with_context=True)
    assert closed.context is None and opened.context is not None and opened.context.startswith("Super Bowl 50")


GOOD_ROWS = {  # a valid first row per schema, so the bad row is the second
    "qa": {"question": "q?", "answers": ["a"]},
    "nq": {"question": "q?", "answer": ["a"]},
    "squad": {"question": "q?", "context": "c", "answers": {"text": ["a"]}},
    "gsm8k": {"question": "q?", "answer": "1 + 1 = 2\n#### 2"},
    "toolbench": {"query": "q?", "relevant APIs": [["tool", "api"]]},
    "messages": {"messages": [{"role": "user", "content": "q?"}, {"role": "assistant", "content": "a"}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "q?"}, {"from": "gpt", "value": "a"}]},
    "prompt_completion": {"prompt": "q?", "completion": "a"},
    "alpaca": {"instruction": "q?", "input": "", "output": "a"},
    "text": {"text": "a"},
}
BAD_ROWS = [  # (schema, the second row as raw text, what the message must say besides file, row and field)
    ("qa", '["q?", "a"]', "expected a JSON object"),
    ("qa", '{"question": "q?"}', "field 'answers' is missing"),
    ("qa", '{"question": "q?", "answers": "a"}', "field 'answers' must be a non-empty list"),
    ("qa", '{"question": "q?", "answers": []}', "field 'answers' must be a non-empty list"),
    ("qa", '{"question": "q?", "answers": [3]}', "field 'answers' must be a non-empty string"),
    ("qa", '{"question": "", "answers": ["a"]}', "field 'question' must be a non-empty string"),
    ("nq", '{"question": "q?", "answer": "Paris"}', "field 'answer' must be a non-empty list"),
    ("squad", '{"question": "q?", "context": "c", "answers": ["a"]}', "field 'answers' must be an object"),
    ("gsm8k", '{"question": "q?", "answer": "It is 72."}', "field 'answer' must end with '#### <number>'"),
    ("toolbench", '{"query": "q?", "relevant APIs": ["tool.api"]}', "field 'relevant APIs' must be"),
    (
        "messages",
        '{"messages": [{"role": "user", "content": "q?"}]}',
        "field 'messages' must end with a user turn and the assistant's answer",
    ),
    ("messages", '{"messages": [{"role": "user", "content": "q?"}, "a"]}', "field 'messages[1]' must be an object"),
    (
        "messages",
        '{"messages": [{"role": "bot", "content": "q?"}, {"role": "assistant", "content": "a"}]}',
        "field 'messages[0].role' must be one of system, user, assistant, got str \"bot\"",
    ),
    (
        "messages",
        '{"messages": [{"role": "user", "content": "q?"}, {"role": "assistant", "content": ""}]}',
        "field 'messages[1].content' must be a non-empty string",
    ),
    (
        "messages",
        '{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q?"}]}',
        "field 'messages' must end with a user turn and the assistant's answer to it",
    ),
    (
        "sharegpt",
        '{"conversations": [{"from": "bot", "value": "q?"}, {"from": "gpt", "value": "a"}]}',
        "field 'conversations[0].from' must be one of system, human, user, gpt, assistant, got str \"bot\"",
    ),
    (
        "sharegpt",
        '{"conversations": [{"from": "human", "value": "q?"}, {"from": "gpt", "content": "a"}]}',
        "field 'conversations[1].value' must be a non-empty string",
    ),
    (
        "sharegpt",
        '{"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q?"}]}',
        "field 'conversations' must end with a user turn and the assistant's answer to it",
    ),
    ("prompt_completion", '{"prompt": "q?", "completion": ""}', "field 'completion' must be a non-empty string"),
    (
        "prompt_completion",
        '{"prompt": [{"role": "user", "content": "q?"}], "completion": [{"role": "user", "content": "a"}]}',
        "field 'completion' must end with a user turn and the assistant's answer",
    ),
    ("prompt_completion", '{"prompt": [], "completion": "a"}', "field 'prompt' must be a non-empty list of turns"),
    ("alpaca", '{"instruction": "q?", "input": 3, "output": "a"}', "field 'input' must be a string (empty for none)"),
    ("alpaca", '{"instruction": "q?", "output": ""}', "field 'output' must be a non-empty string"),
    ("text", '{"text": ["a"]}', "field 'text' must be a non-empty string"),
    ("text", '{"text": " "}', "field 'text' must be a non-empty string"),
]


@pytest.mark.parametrize(("fmt", "row", "problem"), BAD_ROWS)
@pytest.mark.parametrize(("suffix", "where"), [(".jsonl", "line 2"), (".json", "row 2")])
@pytest.mark.parametrize("inferred", [True, False])
def test_a_bad_row_names_file_row_and_field(
    tmp_path: Path, fmt: str, row: str, problem: str, suffix: str, where: str, inferred: bool
) -> None:
    path = tmp_path / f"rows{suffix}"
    rows = [json.dumps(GOOD_ROWS[fmt]), row]
    path.write_text("\n".join(rows) if suffix == ".jsonl" else f"[{', '.join(rows)}]")
    with pytest.raises(DatasetError) as caught:
        load_examples(path, format=None if inferred else fmt)
    message = str(caught.value)
    assert message.startswith(f"{path} {where}: ") and problem in message
    assert "Fix" in message or "Write each row" in message


def test_blank_lines_of_a_jsonl_file_are_skipped_and_still_counted(tmp_path: Path) -> None:
    path, good = tmp_path / "rows.jsonl", json.dumps(GOOD_ROWS["qa"])
    path.write_text(f"{good}\n\n{good}\n   \n")
    assert len(load_examples(path)) == 2
    path.write_text(f"{good}\n\n{good}\n   \n{BAD_ROWS[0][1]}\n")
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(path))} line 5: "):
        load_examples(path)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (
            "bad.jsonl",
            '{"question": "q?", "answers": ["a"]}\n{"question": "q?"',
            r"bad\.jsonl line 2: not valid JSON .*Fix",
        ),
        (
            "bad.json",
            '[{"question": "q?", "answers": ["a"]},\n\n{"question": "q?" "a": 1}]',
            r"bad\.json: .* at line 3 col",
        ),
    ],
)
def test_broken_json_names_its_line(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DatasetError, match=message):
        load_examples(path)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"question": "q?", "answers": ["a"]}', "expected a JSON list of objects"),
        ("[]", "the file holds no rows"),
    ],
)
def test_a_json_file_must_hold_a_list_of_rows(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "rows.json"
    path.write_text(content)
    with pytest.raises(DatasetError, match=problem):
        load_examples(path)


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"question": "q?", "answers": ["a"], "answer": "1 #### 1"}, r"fits several schemas \(qa, gsm8k\)"),
        ({"input": "q?", "output": "a"}, "fits none of the schemas"),
    ],
)
def test_an_unclear_schema_asks_for_dataset_format(tmp_path: Path, row: dict, problem: str) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(row))
    with pytest.raises(DatasetError, match=f"{problem}.*--dataset_format"):
        load_examples(path)


def test_missing_file_unknown_name_and_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"nope\.jsonl: no such file"):
        load_examples(tmp_path / "nope.jsonl")
    (tmp_path / "rows.txt").write_text("question,answer\n")
    with pytest.raises(DatasetError, match=r"rows\.txt: unsupported file type; use a \.json file"):
        load_examples(tmp_path / "rows.txt")
    with pytest.raises(DatasetError, match=r"unknown dataset 'nq_open': use one of facts, nq, squad.*hub id"):
        load_examples("nq_open")
    with pytest.raises(DatasetError, match=r"qa\.jsonl: a local file is a single split.*--eval_dataset"):
        load_examples(DATA / "qa.jsonl", split="eval")
    with pytest.raises(DatasetError, match="unknown split 'test'"):
        load_examples("facts", split="test")
    with pytest.raises(DatasetError, match="unknown dataset format 'csv'"):
        load_examples(DATA / "qa.jsonl", format="csv")
    with pytest.raises(DatasetError, match="applies to local files only"):
        load_examples("facts", format="qa")
    assert DATASETS == ("facts", "nq", "squad", "toolbench", "gsm8k")


# ----------------------------------------------------------------------------------------------------------------
# the hub


@pytest.mark.parametrize(
    ("name", "hub_name", "split", "hub_split", "row"),
    [
        ("nq", "google-research-datasets/nq_open", "eval", "validation", {"question": "q", "answer": ["a"]}),
        ("squad", "rajpurkar/squad", "train", "train", {"question": "q", "context": "c", "answers": {"text": ["a"]}}),
        ("gsm8k", "openai/gsm8k", "eval", "test", {"question": "q", "answer": "1 + 1 = 2\n#### 2"}),
    ],
)
def test_hub_datasets_load_through_load_dataset_and_fail_clearly_offline(
    monkeypatch: pytest.MonkeyPatch, name: str, hub_name: str, split: str, hub_split: str, row: dict
) -> None:
    calls = []

    def fake_load_dataset(path: str, *, split: str, name: str | None) -> list[dict]:
        calls.append((path, name, split))
        return [row]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    (example,) = load_examples(name, split=split)
    assert calls == [(hub_name, "main" if name == "gsm8k" else None, hub_split)] and example.prompt == "q"

    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Offline mode is enabled.")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DatasetError, match=f"could not load '{hub_name}'.*Offline mode.*local .json/.jsonl file"):
        load_examples(name, split=split)


@pytest.fixture
def dataset_folder(tmp_path: Path) -> Path:
    """A local dataset folder as the hub's datasets are laid out: a split per parquet file (train, validation)."""
    folder = tmp_path / "chat"
    folder.mkdir()
    conversations = [[("user", f"q{i}?"), ("assistant", f"a{i}")] for i in range(5)]
    rows = [{"messages": [{"role": role, "content": text} for role, text in turns]} for turns in conversations]
    datasets.Dataset.from_list(rows[:3]).to_parquet(folder / "train.parquet")
    datasets.Dataset.from_list(rows[3:]).to_parquet(folder / "validation.parquet")
    return folder


def test_a_dataset_folder_loads_its_splits_through_load_dataset(dataset_folder: Path) -> None:
    assert [e.prompt for e in load_examples(dataset_folder)] == ["q0?", "q1?", "q2?"]
    held_out = load_examples(dataset_folder, split="eval", split_name="validation")
    assert [(e.prompt, e.answers) for e in held_out] == [("q3?", ["a3"]), ("q4?", ["a4"])]
    with pytest.raises(
        DatasetError, match=r"chat: Unknown split \"test\". Should be one of \['train', 'validation'\].*--eval_split"
    ):
        load_examples(dataset_folder, split="eval")  # the default held-out split, test, is not there
    with pytest.raises(DatasetError, match=r"chat validation row 1: field 'question' is missing"):
        load_examples(dataset_folder, split_name="validation", format="qa")  # rows named as in files
    with pytest.raises(
        DatasetError, match=r"qa\.jsonl: a split or config name .* applies to hub ids and dataset folders"
    ):
        load_examples(DATA / "qa.jsonl", split_name="train")


def test_parquet_and_csv_files_are_one_split_each(tmp_path: Path) -> None:
    datasets.Dataset.from_list([{"text": "First text."}, {"text": "Second text."}]).to_parquet(tmp_path / "t.parquet")
    (tmp_path / "a.csv").write_text('instruction,input,output\nName a colour.,,red\n"Add, then say",2 and 3,5\n')
    assert [e.answers for e in load_examples(tmp_path / "t.parquet")] == [["First text."], ["Second text."]]
    alpaca = load_examples(tmp_path / "a.csv")  # an empty CSV cell is None: no input
    assert [(e.prompt, e.answers) for e in alpaca] == [("Name a colour.", ["red"]), ("Add, then say\n\n2 and 3", ["5"])]
    with pytest.raises(DatasetError, match=r"t\.parquet: a local file is a single split"):
        load_examples(tmp_path / "t.parquet", split="eval")
    (tmp_path / "empty.csv").write_text("text\n")
    with pytest.raises(
        DatasetError, match=r"could not load '.*empty\.csv' \(ValueError: .*no data.*Fix: check the path"
    ):
        load_examples(tmp_path / "empty.csv")


def test_a_hub_id_loads_its_split_through_load_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_load_dataset(path: str, *, split: str, name: str | None) -> list[dict]:
        calls.append((path, name, split))
        return [{"prompt": "q?", "completion": "a"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    load_examples("HuggingFaceH4/ultrachat_200k", split_name="train_sft")
    load_examples("HuggingFaceTB/smoltalk", split="eval", config_name="everyday-conversations")
    assert calls == [
        ("HuggingFaceH4/ultrachat_200k", None, "train_sft"),
        ("HuggingFaceTB/smoltalk", "everyday-conversations", "test"),
    ]
    with pytest.raises(DatasetError, match=r"facts: a split or config name .* applies to hub ids and dataset folders"):
        load_examples("facts", config_name="main")

    def needs_config(path: str, **kwargs: object) -> None:
        raise ValueError("Config name is missing.\nPlease pick one among the available configs: ['all', 'smol-magpie']")

    monkeypatch.setattr(datasets, "load_dataset", needs_config)
    with pytest.raises(DatasetError, match=r"HuggingFaceTB/smoltalk: Config name is missing.*Fix: .*--dataset_config"):
        load_examples("HuggingFaceTB/smoltalk")

    def not_found(path: str, **kwargs: object) -> None:
        raise FileNotFoundError(f"Dataset '{path}' doesn't exist on the Hub or cannot be accessed.")

    monkeypatch.setattr(datasets, "load_dataset", not_found)
    with pytest.raises(DatasetError, match=r"could not load 'me/typo' \(train split\).*doesn't exist.*Fix: check"):
        load_examples("me/typo")


def test_toolbench_by_name_says_where_its_data_is() -> None:
    with pytest.raises(DatasetError, match=r"OpenBMB.*G1_query\.json"):
        load_examples("toolbench")


# ----------------------------------------------------------------------------------------------------------------
# a held-out part split off the training split (--eval_size)


def test_split_off_holds_out_a_seeded_fraction_or_count_in_the_examples_order() -> None:
    examples = [Example(f"q{i}", answers=[str(i)]) for i in range(10)]
    train, held_out = split_off(examples, 0.25, seed=3)
    assert len(held_out) == 3  # ceil(2.5), as datasets' train_test_split rounds its test_size
    assert sorted(train + held_out, key=examples.index) == examples and not set(map(id, train)) & set(map(id, held_out))
    assert train == sorted(train, key=examples.index) and held_out == sorted(held_out, key=examples.index)
    assert split_off(examples, 0.25, seed=3) == (train, held_out) != split_off(examples, 0.25, seed=4)
    assert len(split_off(examples, 4, seed=3)[1]) == 4


@pytest.mark.parametrize(("size", "what"), [(10, "train on"), (0.999, "train on"), (11, "train on")])
def test_split_off_refuses_to_leave_nothing_to_train_on(size: float, what: str) -> None:
    examples = [Example(f"q{i}", answers=[str(i)]) for i in range(10)]
    with pytest.raises(DatasetError, match=rf"^--eval_size {size:g}: \d+ of 10 training examples held out leaves "
                                           rf"nothing to {what}\. Fix: hold out a fraction in \(0, 1\) or a count "
                                           r"below 10\.$"):  # fmt: skip
        split_off(examples, size, seed=0)
