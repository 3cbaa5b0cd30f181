"""Training and evaluation data: the built-in synthetic ``facts`` set, NQ-open, SQuAD, ToolBench, GSM8K, local files.

Every source becomes a list of :class:`Example` (a question, its reference answers, the task that scores it).
Rows are validated eagerly, so a bad file fails with one :class:`DatasetError` naming the file, the row, the field
and the fix before any training starts. :func:`tokenize_for_training` and :func:`format_prompt` turn examples into
token ids the same way for training and for generation.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from meft_ds.metrics import final_number

DATASETS = ("facts", "nq", "squad", "toolbench", "gsm8k")
FORMATS = ("qa", "nq", "squad", "toolbench", "gsm8k")
SPLITS = ("train", "eval")
IGNORE_INDEX = -100  # label of the tokens that are not learned (prompt, padding)


class DatasetError(ValueError):
    """A dataset cannot be loaded; the message names the file, row and field, and how to fix it."""


@dataclass
class Example:
    """One question with its reference answers. ``answers[0]`` is the training target.

    ``task`` picks the metrics (see :func:`meft_ds.metrics.score`): "qa" (EM/F1), "toolbench" (API-call IoU) or
    "gsm8k" (final-number accuracy). ``context`` is a passage shown before the question (SQuAD open-book)."""

    prompt: str
    answers: list[str]
    task: str = "qa"
    context: str | None = None


# ----------------------------------------------------------------------------------------------------------------
# facts: a synthetic knowledge set no pretrained model can know

_SYLLABLES = (
    "zor", "bek", "qui", "lan", "vex", "mor", "tal", "dri", "pha", "nox", "ul", "esk", "ryn", "thi",
    "ga", "lor", "bri", "xan", "ove", "kel", "sab", "wyn", "dro", "fen", "ith", "cal", "vur", "ost",
)  # fmt: skip
_VALUES: dict[str, tuple[str, ...]] = {
    "birthplace": (
        "Varnholm", "Quessaly", "Drumwick", "Oskarine", "Tellarby", "Zembrook", "Halvinor", "Brisquay",
        "Morvenna", "Caldrith", "Ulvesse", "Pentharrow", "Koravel", "Lissandor", "Grumholt", "Yarrowick",
        "Nimbrel", "Ostrevar", "Vaskadel", "Thornquill",
    ),
    "occupation": (
        "glassblower", "cartographer", "beekeeper", "clockmaker", "astronomer", "blacksmith", "violinist",
        "botanist", "locksmith", "potter", "falconer", "perfumer", "bookbinder", "tailor", "shipwright",
    ),
    "birth_year": tuple(str(year) for year in range(1701, 1990, 7)),
    "colour": (
        "crimson", "teal", "ochre", "violet", "amber", "indigo", "scarlet", "olive", "turquoise", "magenta",
        "saffron", "cobalt",
    ),
    "pet": (
        "Bixlo", "Mirrow", "Quenby", "Tazzle", "Plimsy", "Grizzop", "Wexley", "Oomba", "Trindle", "Skorpel",
        "Vimsy", "Lopple", "Dashkin", "Fubbles", "Ruxa", "Pindor", "Kibbet", "Yolli", "Zephrin", "Marbo",
    ),
}  # fmt: skip
# Train and eval phrasings are disjoint: eval asks the same facts in words never seen in training.
_TEMPLATES: dict[str, dict[str, tuple[str, ...]]] = {
    "train": {
        "birthplace": ("Where was {name} born?", "In which city was {name} born?", "What is the birthplace of {name}?"),
        "occupation": ("What is {name}'s occupation?", "What does {name} do for a living?", "What is {name}'s job?"),
        "birth_year": ("In what year was {name} born?", "What is {name}'s birth year?", "When was {name} born?"),
        "colour": (
            "What is {name}'s favourite colour?",
            "Which colour does {name} like best?",
            "What colour does {name} prefer?",
        ),
        "pet": ("What is the name of {name}'s pet?", "What is {name}'s pet called?", "What did {name} name their pet?"),
    },
    "eval": {
        "birthplace": ("{name} was born in which city?", "Name the city where {name} was born."),
        "occupation": ("What kind of work does {name} do?", "{name} works as what?"),
        "birth_year": ("Which year was {name} born in?", "{name} was born in what year?"),
        "colour": ("{name}'s favourite colour is which one?", "What is the favourite color of {name}?"),
        "pet": ("{name} has a pet; what is it called?", "Tell me the name of the pet that {name} owns."),
    },
}


@dataclass(frozen=True)
class Fact:
    """One fact of the ``facts`` set: ``entity``'s ``attribute`` is ``answer``."""

    entity: str
    attribute: str
    answer: str


def _invented_name(rng: random.Random) -> str:
    def word(syllables: int) -> str:
        return "".join(rng.sample(_SYLLABLES, syllables)).capitalize()

    return f"{word(2)} {word(rng.choice((2, 3)))}"


def make_facts(*, num_entities: int = 30, seed: int = 0) -> list[Fact]:
    """``num_entities`` fictional people with invented names, each with one value per attribute (birthplace,
    occupation, birth year, favourite colour, pet's name) drawn from fixed vocabularies: 5 facts per entity."""
    if num_entities < 1:
        raise ValueError(f"num_entities must be >= 1, got {num_entities}")
    rng = random.Random(seed)
    names: list[str] = []
    while len(names) < num_entities:
        name = _invented_name(rng)
        if not any(name in other or other in name for other in names):  # "Ab Cd" would blur with "Ab Cdef"
            names.append(name)
    return [Fact(name, attribute, rng.choice(values)) for name in names for attribute, values in _VALUES.items()]


def facts_dataset(split: str = "train", *, num_entities: int = 30, seed: int = 0) -> list[Example]:
    """The built-in ``facts`` set: every fact of :func:`make_facts` asked with each template of ``split`` ("train":
    3 phrasings per attribute, "eval": 2 held-out ones), shuffled; deterministic for a seed. The defaults give 150
    facts, 450 train and 300 eval examples."""
    _check_split(split)
    examples = [
        Example(template.format(name=fact.entity), [fact.answer])
        for fact in make_facts(num_entities=num_entities, seed=seed)
        for template in _TEMPLATES[split][fact.attribute]
    ]
    random.Random(f"{seed}:{split}").shuffle(examples)
    return examples


# ----------------------------------------------------------------------------------------------------------------
# Row schemas (local files and hub rows)

_SCHEMAS = {
    "qa": '{"question": "...", "answers": ["...", ...]}',
    "nq": '{"question": "...", "answer": ["...", ...]} (NQ-open)',
    "squad": '{"question": "...", "context": "...", "answers": {"text": ["...", ...]}} (SQuAD)',
    "toolbench": '{"query": "...", "relevant APIs": [["tool name", "api name"], ...]} (ToolBench G*_query.json)',
    "gsm8k": '{"question": "...", "answer": "... #### <number>"} (GSM8K)',
}


def _describe(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


_FETCH = object()  # "read the value from the row" (None is a value: JSON null)


class _Row:
    """One row under validation; its errors name the place (file and row), the field and the expected schema."""

    def __init__(self, data: dict[str, Any], where: str, fmt: str) -> None:
        self.data, self.where, self.fmt = data, where, fmt

    def error(self, field: str, problem: str) -> DatasetError:
        return DatasetError(
            f"{self.where}: field '{field}' {problem}. Fix the row; {self.fmt} rows look like {_SCHEMAS[self.fmt]}"
        )

    def get(self, field: str) -> Any:
        if field not in self.data:
            raise self.error(field, f"is missing (the row has {sorted(self.data)})")
        return self.data[field]

    def text(self, field: str, value: Any = _FETCH) -> str:
        value = self.get(field) if value is _FETCH else value
        if not isinstance(value, str) or not value.strip():
            raise self.error(field, f"must be a non-empty string, got {_describe(value)}")
        return value

    def texts(self, field: str, value: Any = _FETCH) -> list[str]:
        value = self.get(field) if value is _FETCH else value
        if not isinstance(value, list) or not value:
            raise self.error(field, f"must be a non-empty list of strings, got {_describe(value)}")
        for item in value:
            self.text(field, item)
        return list(dict.fromkeys(value))  # drop duplicates, keep the order (the first is the training target)


def _parse_qa(row: _Row) -> Example:
    return Example(row.text("question"), row.texts("answers"))


def _parse_nq(row: _Row) -> Example:
    return Example(row.text("question"), row.texts("answer"))


def _parse_squad(row: _Row) -> Example:
    answers = row.get("answers")
    if not isinstance(answers, dict) or "text" not in answers:
        raise row.error("answers", f"must be an object with a 'text' list, got {_describe(answers)}")
    return Example(row.text("question"), row.texts("answers.text", answers["text"]), context=row.text("context"))


def _parse_gsm8k(row: _Row) -> Example:
    answer = row.text("answer")
    if "####" not in answer or final_number(answer) is None:
        raise row.error("answer", "must end with '#### <number>', the final answer")
    return Example(row.text("question"), [answer], task="gsm8k")


def render_api_calls(apis: Sequence[Sequence[str]]) -> str:
    """ToolBench's relevant APIs as the target text: ``tool.api`` calls joined by ``"; "``, on one line (the form
    :func:`meft_ds.metrics.parse_api_calls` reads)."""
    return "; ".join(f"{tool}.{api}" for tool, api in apis)


def _parse_toolbench(row: _Row) -> Example:
    apis = row.get("relevant APIs")
    if not (isinstance(apis, list) and apis and all(isinstance(api, list) and len(api) == 2 for api in apis)):
        raise row.error(
            "relevant APIs", f"must be a non-empty list of [tool name, api name] pairs, got {_describe(apis)}"
        )
    for api in apis:
        row.texts("relevant APIs", api)
    return Example(row.text("query"), [render_api_calls(apis)], task="toolbench")


_PARSERS: dict[str, Callable[[_Row], Example]] = {
    "qa": _parse_qa,
    "nq": _parse_nq,
    "squad": _parse_squad,
    "toolbench": _parse_toolbench,
    "gsm8k": _parse_gsm8k,
}
_SIGNATURES: dict[str, Callable[[dict[str, Any]], bool]] = {
    "qa": lambda row: "question" in row and isinstance(row.get("answers"), list),
    "nq": lambda row: "question" in row and isinstance(row.get("answer"), list),
    "squad": lambda row: "question" in row and isinstance(row.get("answers"), dict),
    "toolbench": lambda row: "query" in row and "relevant APIs" in row,
    "gsm8k": lambda row: "question" in row and isinstance(row.get("answer"), str),
}


def _infer_format(row: dict[str, Any], where: str) -> str:
    matches = [fmt for fmt, matches in _SIGNATURES.items() if matches(row)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        found = f"fits several schemas ({', '.join(matches)})"
    else:
        found = "fits none of the schemas: " + "; ".join(f"{fmt} {schema}" for fmt, schema in _SCHEMAS.items())
    raise DatasetError(
        f"{where}: cannot tell the dataset schema from the fields {sorted(row)}: it {found}. "
        f"Set --dataset_format (format= in Python) to one of {', '.join(FORMATS)}"
    )


def _parse_rows(rows: Sequence[tuple[str, Any]], fmt: str | None) -> list[Example]:
    examples = []
    for where, row in rows:
        if not isinstance(row, dict):
            raise DatasetError(f"{where}: expected a JSON object, got {_describe(row)}. Write each row as an object")
        fmt = fmt or _infer_format(row, where)
        examples.append(_PARSERS[fmt](_Row(row, where, fmt)))
    return examples


# ----------------------------------------------------------------------------------------------------------------
# Sources: local files, the Hugging Face hub


def _read_jsonl(path: Path) -> list[tuple[str, Any]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"{path} line {number}", json.loads(line)))
        except json.JSONDecodeError as err:
            raise DatasetError(
                f"{path} line {number}: not valid JSON ({err.msg} at column {err.colno}). "
                "Fix that line; a .jsonl file holds one JSON object per line"
            ) from None
    return rows


def _read_json(path: Path) -> list[tuple[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DatasetError(
            f"{path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno}). "
            "Fix the file; a .json file holds one list of objects"
        ) from None
    if not isinstance(data, list):
        raise DatasetError(
            f"{path}: expected a JSON list of objects, got {type(data).__name__}. "
            "Wrap the rows in [...], or write them one per line in a .jsonl file"
        )
    return [(f"{path} row {number}", row) for number, row in enumerate(data, start=1)]


def _load_file(path: Path, fmt: str | None) -> list[Example]:
    readers = {".jsonl": _read_jsonl, ".json": _read_json}
    if path.suffix not in readers:
        raise DatasetError(f"{path}: unsupported file type; use a .json file (a list of objects) or a .jsonl file")
    if not path.is_file():
        raise DatasetError(f"{path}: no such file. Pass the path of an existing .json or .jsonl file")
    rows = readers[path.suffix](path)
    if not rows:
        raise DatasetError(f"{path}: the file holds no rows. Add rows like {_SCHEMAS[fmt or 'qa']}")
    return _parse_rows(rows, fmt)


@dataclass(frozen=True)
class _HubSource:
    path: str
    config: str | None
    splits: dict[str, str]  # our split -> the hub's


_HUB = {
    "nq": _HubSource("google-research-datasets/nq_open", None, {"train": "train", "eval": "validation"}),
    "squad": _HubSource("rajpurkar/squad", None, {"train": "train", "eval": "validation"}),
    "gsm8k": _HubSource("openai/gsm8k", "main", {"train": "train", "eval": "test"}),
}


def _load_hub(name: str, split: str) -> list[Example]:
    import datasets  # slow to import; only the hub path needs it

    source = _HUB[name]
    hub_split = source.splits[split]
    try:
        rows = datasets.load_dataset(source.path, source.config, split=hub_split)
    except Exception as err:  # offline, unreachable, missing: all end the same way for the user
        raise DatasetError(
            f"could not fetch '{source.path}' ({hub_split} split) from the Hugging Face hub "
            f"({type(err).__name__}: {err}). Without the hub, pass the path of a local .json/.jsonl file instead "
            f"of '{name}', with rows like {_SCHEMAS[name]} (--dataset_format {name})"
        ) from err
    return _parse_rows([(f"{source.path} {hub_split} row {i}", row) for i, row in enumerate(rows, start=1)], name)


def _toolbench_not_on_hub() -> DatasetError:
    return DatasetError(
        "ToolBench's instruction data (query -> relevant APIs) is not on the Hugging Face hub: it is released by "
        "OpenBMB (github.com/OpenBMB/ToolBench, 'Data Release', data.zip). Download it and pass the path of "
        f"data/instruction/G1_query.json (or G2/G3) instead of 'toolbench'; rows look like {_SCHEMAS['toolbench']}"
    )


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}: use 'train' or 'eval'")


def load_examples(
    name_or_path: str | Path,
    split: str = "train",
    *,
    format: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    with_context: bool = False,
) -> list[Example]:
    """Load and validate every example of a built-in dataset or a local file.

    ``name_or_path``: one of :data:`DATASETS` or a ``.json`` (a list of objects) / ``.jsonl`` (one object per line)
    file. ``facts`` is generated from ``seed`` (see :func:`facts_dataset`); ``nq`` (NQ-open), ``squad`` and ``gsm8k``
    come from the Hugging Face hub (eval = their validation/test split). ToolBench's data is not on the hub: pass its
    ``G*_query.json`` file, whose rows hold ``query`` and ``relevant APIs`` ([tool, api] pairs); the target is those
    calls as ``tool.api; tool.api`` and the metric their set IoU (as in the MEFT paper).
    A local file is one split, loaded with ``split="train"`` (``"eval"`` raises: pass a held-out file instead);
    ``seed`` does not apply to it.

    ``format``: the schema of a local file's rows (one of :data:`FORMATS`; "qa" is ``{"question", "answers"}``),
    inferred from the first row when None. ``limit``: keep the first ``limit`` examples. ``with_context``: show
    SQuAD's passage before the question (open-book); by default SQuAD is closed-book, as in the MEFT paper.
    """
    _check_split(split)
    if format is not None and format not in FORMATS:
        raise DatasetError(f"unknown dataset format {format!r}: use one of {', '.join(FORMATS)}")
    if limit is not None and limit < 1:
        raise DatasetError(f"limit must be a positive number of examples, got {limit}")
    name = str(name_or_path)
    if name in DATASETS and format is not None:
        raise DatasetError(f"--dataset_format (format=) applies to local files only; drop it for the built-in '{name}'")
    if name == "facts":
        examples = facts_dataset(split, seed=seed)
    elif name == "toolbench":
        raise _toolbench_not_on_hub()
    elif name in _HUB:
        examples = _load_hub(name, split)
    elif Path(name).suffix in (".json", ".jsonl") or Path(name).exists():
        if split == "eval":  # a file has no held-out part: evaluating on it would score the training data
            raise DatasetError(
                f"{name}: a local file is a single split, so it has no 'eval' part; pass a held-out file with "
                "--eval_dataset (loaded as its own 'train' split), or skip evaluation with --no_eval"
            )
        examples = _load_file(Path(name), format)
    else:
        raise DatasetError(
            f"unknown dataset {name!r}: use one of {', '.join(DATASETS)}, or the path of a local .json/.jsonl file"
        )
    if not with_context:
        examples = [replace(example, context=None) for example in examples]
    return examples[:limit]


# ----------------------------------------------------------------------------------------------------------------
# Prompts and token ids


def has_chat_template(tokenizer: Any) -> bool:
    """Whether prompts go through the tokenizer's chat template (else the plain "Question: ...\\nAnswer:" form).
    Chat-formatted text carries its own special tokens, so it is tokenized with ``add_special_tokens=False``."""
    return bool(getattr(tokenizer, "chat_template", None))


def _user_message(example: Example) -> dict[str, str]:
    content = f"Context: {example.context}\nQuestion: {example.prompt}" if example.context else example.prompt
    return {"role": "user", "content": content}


def format_prompt(tokenizer: Any, example: Example) -> str:
    """The text the model sees before its answer, identical in training and in generation: the question as a user
    turn plus the assistant header with a chat template, else ``"Question: {q}\\nAnswer:"`` (context first)."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template([_user_message(example)], tokenize=False, add_generation_prompt=True)
    context = f"Context: {example.context}\n" if example.context else ""
    return f"{context}Question: {example.prompt}\nAnswer:"


def _answer_text(tokenizer: Any, example: Example) -> str:
    """What follows the prompt in training: the assistant turn up to the template's end-of-turn marker, or
    ``" {answer}"`` (the EOS id is appended by the caller)."""
    answer = example.answers[0]
    if not has_chat_template(tokenizer):
        return f" {answer}"
    prompt = format_prompt(tokenizer, example)
    conversation = [_user_message(example), {"role": "assistant", "content": answer}]
    full = tokenizer.apply_chat_template(conversation, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError(
            "the tokenizer's chat template does not render the prompt (add_generation_prompt=True) as the start of "
            "the full conversation, so the answer tokens cannot be separated; remove tokenizer.chat_template to "
            "use the plain 'Question: ... Answer:' format"
        )
    return full[len(prompt) :]


def _encode(tokenizer: Any, example: Example) -> tuple[list[int], list[int]]:
    """Prompt and answer ids, tokenized apart so the prompt ids equal those given to ``generate``."""
    chat = has_chat_template(tokenizer)
    prompt_ids = tokenizer(format_prompt(tokenizer, example), add_special_tokens=not chat)["input_ids"]
    answer_ids = tokenizer(_answer_text(tokenizer, example), add_special_tokens=False)["input_ids"]
    if not chat and tokenizer.eos_token_id is not None:
        answer_ids = [*answer_ids, tokenizer.eos_token_id]
    return list(prompt_ids), list(answer_ids)


def tokenize_for_training(examples: Sequence[Example], tokenizer: Any, max_length: int) -> list[dict[str, list[int]]]:
    """``{"input_ids", "labels"}`` per example: prompt then answer, labels ``-100`` on the prompt tokens.

    Over ``max_length``, the prompt loses its first tokens (the question's end and the answer cue stay); an answer
    that alone fills ``max_length`` is cut after one prompt token. Raises ValueError when no answer fits at all.
    """
    encoded = [_encode(tokenizer, example) for example in examples]
    if encoded and all(len(answer) >= max_length for _, answer in encoded):
        shortest = min(len(answer) for _, answer in encoded)
        raise ValueError(
            f"max_length={max_length} is too small for any answer: the shortest answer takes {shortest} tokens and "
            f"at least one prompt token must precede it; raise max_length well above {shortest} (256 is usual)"
        )
    features = []
    for prompt_ids, answer_ids in encoded:
        answer_ids = answer_ids[: max_length - 1]
        prompt_ids = prompt_ids[-(max_length - len(answer_ids)) :]
        features.append({"input_ids": prompt_ids + answer_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids})
    return features


def collate(features: Sequence[dict[str, list[int]]], pad_token_id: int | None) -> dict[str, torch.Tensor]:
    """Right-pad a batch of features into ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding)."""
    if not features:
        raise ValueError("collate needs at least one feature")
    if pad_token_id is None:
        raise ValueError(
            "pad_token_id is None: pass tokenizer.pad_token_id, or its eos_token_id if it has no pad token"
        )
    width = max(len(feature["input_ids"]) for feature in features)
    input_ids = torch.full((len(features), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(features), width), dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    for row, feature in enumerate(features):
        length = len(feature["input_ids"])
        input_ids[row, :length] = torch.tensor(feature["input_ids"])
        attention_mask[row, :length] = 1
        labels[row, :length] = torch.tensor(feature["labels"])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
