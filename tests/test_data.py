"""Datasets: the synthetic facts set, local schemas, one clear error per bad row, the hub path, tokenization."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import replace
from pathlib import Path

import datasets
import pytest
import torch
from tiny_models import CHATML, word_tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from meft_ds import models
from meft_ds.data import (
    DATASETS,
    IGNORE_INDEX,
    DatasetError,
    Example,
    collate,
    facts_dataset,
    format_prompt,
    load_examples,
    tokenize_for_training,
)
from meft_ds.facts import make_facts

DATA = Path(__file__).parent / "data"


# ----------------------------------------------------------------------------------------------------------------
# facts


def _asked(example: Example, entities: set[str]) -> tuple[str, str, str]:
    """(question template, entity, answer) of a facts example."""
    (entity,) = [name for name in entities if name in example.prompt]
    return example.prompt.replace(entity, "{name}"), entity, example.answers[0]


def test_facts_is_deterministic_per_seed_and_differs_across_seeds() -> None:
    assert load_examples("facts", seed=0) == load_examples("facts", seed=0)
    assert load_examples("facts", split="eval", seed=3) == load_examples("facts", split="eval", seed=3)
    assert make_facts(seed=0) != make_facts(seed=1)
    assert {e.prompt for e in load_examples("facts", seed=0)} != {e.prompt for e in load_examples("facts", seed=1)}


def test_facts_sized_by_count() -> None:
    assert load_examples("facts", "eval", facts=40, seed=2) == facts_dataset("eval", num_entities=8, seed=2)
    assert len(load_examples("facts", facts=40)) == 3 * 40 and load_examples("facts", facts=None) == facts_dataset()
    for facts, name in ((42, "facts"), (0, "facts"), (40, "squad")):
        with pytest.raises(DatasetError, match=rf"--facts {facts}: needs --dataset facts and a multiple of 5"):
            load_examples(name, facts=facts)


def test_facts_default_shape() -> None:
    facts = make_facts()
    assert len(facts) == 150 and len({fact.entity for fact in facts}) == 30
    train, held_out = load_examples("facts"), load_examples("facts", split="eval")
    assert (len(train), len(held_out)) == (450, 300)
    assert all(e.task == "qa" and len(e.answers) == 1 and len(e.answers[0].split()) <= 2 for e in train + held_out)
    assert len(facts_dataset(num_entities=4)) == 4 * 5 * 3


def test_train_and_eval_templates_are_disjoint_but_ask_the_same_facts() -> None:
    facts = make_facts()
    entities = {fact.entity for fact in facts}
    train = [_asked(e, entities) for e in load_examples("facts")]
    held_out = [_asked(e, entities) for e in load_examples("facts", split="eval")]
    train_templates, eval_templates = {t for t, _, _ in train}, {t for t, _, _ in held_out}
    assert (len(train_templates), len(eval_templates)) == (15, 10)  # 3 and 2 phrasings for each of 5 attributes
    assert train_templates.isdisjoint(eval_templates)
    asked = {(fact.entity, fact.answer) for fact in facts}
    assert {(e, a) for _, e, a in train} == {(e, a) for _, e, a in held_out} == asked


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
# tokenization


@pytest.mark.parametrize("chat", [False, True])
def test_tokenize_for_training_learns_exactly_the_answer(chat: bool) -> None:
    tokenizer = word_tokenizer(chat=chat)
    examples = load_examples("facts", limit=4)
    for example, feature in zip(examples, tokenize_for_training(examples, tokenizer, max_length=256), strict=True):
        prompt_ids = tokenizer(format_prompt(tokenizer, example), add_special_tokens=not chat)["input_ids"]
        n = len(prompt_ids)
        assert feature["input_ids"][:n] == prompt_ids
        assert feature["labels"][:n] == [IGNORE_INDEX] * n
        assert feature["labels"][n:] == feature["input_ids"][n:]
        learned = tokenizer.decode(feature["labels"][n:])
        assert learned == (f"{example.answers[0]}<|im_end|>\n" if chat else f" {example.answers[0]}<|endoftext|>")
    if chat:
        assert (
            format_prompt(tokenizer, examples[0])
            == f"<|im_start|>user\n{examples[0].prompt}<|im_end|>\n<|im_start|>assistant\n"
        )
    else:
        assert format_prompt(tokenizer, examples[0]) == f"Question: {examples[0].prompt}\nAnswer:"


@pytest.mark.parametrize("chat", [False, True])
def test_a_conversation_learns_every_assistant_turn_each_prompted_by_the_turns_before_it(chat: bool) -> None:
    tokenizer = word_tokenizer(chat=chat)
    conversation, single = load_examples(DATA / "messages.jsonl")
    assert [turn["role"] for turn in conversation.history] == ["system", "user", "assistant"] and not single.history
    plain, turns = load_examples(DATA / "prompt_completion.jsonl")  # TRL's form, standard and conversational
    assert not plain.history and turns.history == [{"role": "system", "content": "You answer in one word."}]
    assert (turns.prompt, turns.answers) == ("What is the capital of Italy?", ["Rome"])
    prompt = format_prompt(tokenizer, conversation)
    ordered = ["You answer in one word.", "What is the capital of France?", "Paris", "And of Italy?"]
    assert [prompt.index(text) for text in ordered] == sorted(prompt.index(text) for text in ordered)
    if not chat:
        assert prompt.endswith("Answer: Paris\nQuestion: And of Italy?\nAnswer:")

    (feature,) = tokenize_for_training([conversation], tokenizer, max_length=256)
    prompt_ids = tokenizer(prompt, add_special_tokens=not chat)["input_ids"]  # what generate gets
    assert feature["input_ids"][: len(prompt_ids)] == prompt_ids
    assert _learned(tokenizer, feature) == (
        ["Paris<|im_end|>\n", "Rome<|im_end|>\n"] if chat else [" Paris\n", " Rome<|endoftext|>"]
    )  # every assistant turn, each with its end of turn
    (cut,) = tokenize_for_training([conversation], tokenizer, max_length=len(feature["input_ids"]) - 2)
    assert cut["input_ids"] == feature["input_ids"][2:] and cut["labels"] == feature["labels"][2:]
    completion = replace(conversation, learn_history=False)  # TRL's prompt-completion rows learn the completion only
    (feature,) = tokenize_for_training([completion], tokenizer, max_length=256)
    assert _learned(tokenizer, feature) == (["Rome<|im_end|>\n"] if chat else [" Rome<|endoftext|>"])


def _learned(tokenizer: PreTrainedTokenizerFast, feature: dict[str, list[int]]) -> list[str]:
    """The learned stretches of a feature, decoded one by one."""
    stretches: list[list[int]] = []
    for position, label in enumerate(feature["labels"]):
        if label != IGNORE_INDEX:
            assert label == feature["input_ids"][position]
            if position == 0 or feature["labels"][position - 1] == IGNORE_INDEX:
                stretches.append([])
            stretches[-1].append(label)
    return [tokenizer.decode(stretch) for stretch in stretches]


def test_a_template_that_renders_earlier_turns_anew_learns_the_last_answer(caplog: pytest.LogCaptureFixture) -> None:
    """Some templates render a conversation's start differently as it grows (Mistral's first ones move the system
    prompt into the last user turn): its earlier answers cannot be found, so the last one alone is learned."""
    tokenizer = word_tokenizer(chat=True)
    tokenizer.chat_template = (  # ChatML with the system prompt shown in the last user turn
        "{% set last = namespace(user=0) %}{% for m in messages %}{% if m['role'] == 'user' %}"
        "{% set last.user = loop.index0 %}{% endif %}{% endfor %}"
        "{% for m in messages if m['role'] != 'system' %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'user' and messages[last.user] is sameas m and messages[0]['role'] == 'system' %}"
        "{{ messages[0]['content'] }}\n{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    conversation, _ = load_examples(DATA / "messages.jsonl")
    with caplog.at_level(logging.WARNING, logger="meft_ds.data"):
        (feature,) = tokenize_for_training([conversation], tokenizer, max_length=256)
    assert _learned(tokenizer, feature) == ["Rome<|im_end|>\n"]
    assert caplog.text.count("learn their last answer only") == 1
    with caplog.at_level(logging.WARNING, logger="meft_ds.data"):  # once per template, not per conversation
        tokenize_for_training([conversation], tokenizer, max_length=256)
    assert caplog.text.count("learn their last answer only") == 1
    tokenizer.chat_template = (  # refuses the conversation cut short, renders the whole one
        "{% if messages | length < 4 %}{{ raise_exception('too short') }}{% endif %}" + CHATML
    )
    (feature,) = tokenize_for_training([conversation], tokenizer, max_length=256)
    assert _learned(tokenizer, feature) == ["Rome<|im_end|>\n"]


def test_a_conversation_the_chat_template_refuses_is_named() -> None:
    """Llama-2's and Mistral's templates raise on turns that do not alternate: it came out as a jinja2 traceback."""
    tokenizer = word_tokenizer(chat=True)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    conversation, single = load_examples(DATA / "messages.jsonl")  # the first opens with a system turn
    tokenize_for_training([single], tokenizer, max_length=64)
    with pytest.raises(DatasetError, match=r"^example 2 \('And of Italy\?'\): the tokenizer's chat template refuses"):
        tokenize_for_training([single, conversation], tokenizer, max_length=64)


@pytest.mark.parametrize("chat", [False, True])
def test_plain_texts_are_learned_whole_packed_in_windows_of_max_length(chat: bool) -> None:
    """Continued pretraining: no template, no prompt, every token learned; texts are packed one after another and
    cut (not truncated) into windows, none padded but the last."""
    tokenizer = word_tokenizer(chat=chat)
    question, _ = load_examples("facts", limit=2)
    text, other = load_examples(DATA / "text.jsonl")
    ids, other_ids = ([*tokenizer(t.answers[0])["input_ids"], tokenizer.eos_token_id] for t in (text, other))
    assert tokenizer.decode(ids) == text.answers[0] + tokenizer.eos_token
    (whole,) = tokenize_for_training([text], tokenizer, max_length=len(ids))
    assert whole == {"input_ids": ids, "labels": ids}
    windows = tokenize_for_training([text, question, other], tokenizer, max_length=7)  # questions first, then texts
    assert windows[0] == tokenize_for_training([question], tokenizer, max_length=7)[0]
    stream = ids + other_ids
    cut = [stream[start : start + 7] for start in range(0, len(stream), 7)]
    assert [window["input_ids"] for window in windows[1:]] == cut and all(len(w) == 7 for w in cut[:-1])
    assert all(window["labels"] == window["input_ids"] for window in windows[1:])
    (longest,) = tokenize_for_training([text], tokenizer, max_length=len(ids) - 1)  # a window of one token predicts
    assert longest["input_ids"] == ids[:-1]  # nothing: dropped


def test_context_comes_before_the_question() -> None:
    example = Example("Who won?", ["Denver"], context="Denver won.")
    assert format_prompt(word_tokenizer(chat=False), example) == "Context: Denver won.\nQuestion: Who won?\nAnswer:"
    assert "user\nContext: Denver won.\nQuestion: Who won?<|im_end|>" in format_prompt(
        word_tokenizer(chat=True), example
    )


def test_truncation_keeps_the_answer_and_the_end_of_the_prompt() -> None:
    tokenizer = word_tokenizer(chat=False)
    example = load_examples("facts", limit=1)
    (full,) = tokenize_for_training(example, tokenizer, max_length=256)
    (cut,) = tokenize_for_training(example, tokenizer, max_length=len(full["input_ids"]) - 3)
    assert cut["input_ids"] == full["input_ids"][3:] and cut["labels"] == full["labels"][3:]
    answer_length = sum(label != IGNORE_INDEX for label in full["labels"])
    with pytest.raises(ValueError, match=f"max_length={answer_length} is too small for any answer"):
        tokenize_for_training(example, tokenizer, max_length=answer_length)


def test_collate_right_pads() -> None:
    features = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = collate(features, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())
    with pytest.raises(ValueError, match="pad_token_id is None"):
        collate(features, pad_token_id=None)


@pytest.mark.slow
def test_smollm2_chat_template_masks_its_prompt() -> None:
    tokenizer = AutoTokenizer.from_pretrained(models.builtin_model_folder())  # what every entry point loads
    (example,) = load_examples("facts", limit=1)
    (feature,) = tokenize_for_training([example], tokenizer, max_length=256)
    learned = [token for token, label in zip(feature["input_ids"], feature["labels"], strict=True) if label != -100]
    assert tokenizer.decode(learned) == f"{example.answers[0]}<|im_end|>\n"
    prompt = tokenizer.decode(feature["input_ids"][: len(feature["input_ids"]) - len(learned)])
    assert prompt.endswith(f"<|im_start|>user\n{example.prompt}<|im_end|>\n<|im_start|>assistant\n")
