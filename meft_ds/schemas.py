"""Dataset rows: the schemas of local files' rows and the hub's, each parsed and validated into an :class:`Example`.

Rows are validated eagerly, so a bad file fails with one :class:`DatasetError` naming the file, the row, the field
and the fix before any training starts. :mod:`meft_ds.data` finds the rows (local files, the hub, the built-in
``facts`` set) and turns examples into token ids.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meft_ds.metrics import final_number

FORMATS = ("qa", "nq", "squad", "toolbench", "gsm8k", "messages", "sharegpt", "prompt_completion", "alpaca", "text")
ROLES = ("system", "user", "assistant")  # the roles of a conversation's turns
# ShareGPT's speakers (FastChat's human/gpt, and the role names some of its datasets use instead) as those roles
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
TEXT = "text"  # the task of a plain text: every token learned, scored by its loss (no question, nothing generated)


class DatasetError(ValueError):
    """A dataset cannot be loaded; the message names the file, row and field, and how to fix it."""


@dataclass
class Example:
    """One question with its reference answers. ``answers[0]`` is the training target.

    ``task`` picks the metrics (see :func:`meft_ds.metrics.score`): "qa" (EM/F1), "toolbench" (API-call IoU) or
    "gsm8k" (final-number accuracy); :data:`TEXT` is a plain text (``answers[0]``, its ``prompt`` empty), learned
    whole and scored by its loss. ``context`` is a passage shown before the question (SQuAD open-book).
    ``history``: the conversation before the question (a messages row's earlier turns, its system prompt included),
    ``{"role", "content"}`` dicts shown before it. ``learn_history``: its assistant turns are learned too, each
    prompted by the turns before it (a messages row's; a conversational prompt's are only its prompt)."""

    prompt: str
    answers: list[str]
    task: str = "qa"
    context: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)
    learn_history: bool = False


# ----------------------------------------------------------------------------------------------------------------
# Row schemas (local files and hub rows)

SCHEMAS = {
    "qa": '{"question": "...", "answers": ["...", ...]}',
    "nq": '{"question": "...", "answer": ["...", ...]} (NQ-open)',
    "squad": '{"question": "...", "context": "...", "answers": {"text": ["...", ...]}} (SQuAD)',
    "toolbench": '{"query": "...", "relevant APIs": [["tool name", "api name"], ...]} (ToolBench G*_query.json)',
    "gsm8k": '{"question": "...", "answer": "... #### <number>"} (GSM8K)',
    "messages": '{"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}, ..., '
    '{"role": "assistant", "content": "..."}]} (chat: every assistant turn is learned, the last one scored)',
    "sharegpt": '{"conversations": [{"from": "system", "value": "..."}, {"from": "human", "value": "..."}, ..., '
    '{"from": "gpt", "value": "..."}]} (ShareGPT: learned and scored as messages)',
    "prompt_completion": '{"prompt": "...", "completion": "..."} (TRL\'s; or both lists of turns as in messages)',
    "alpaca": '{"instruction": "...", "input": "..." (may be empty or null), "output": "..."} (Alpaca)',
    "text": '{"text": "..."} (plain text, every token learned: continued pretraining; scored by its loss)',
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
            f"{self.where}: field '{field}' {problem}. Fix the row; {self.fmt} rows look like {SCHEMAS[self.fmt]}"
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


def _turns(
    row: _Row, field: str, keys: tuple[str, str] = ("role", "content"), roles: dict[str, str] | None = None
) -> list[dict[str, str]]:
    """The ``{"role", "content"}`` turns of the list ``field``, each checked: each turn's speaker and text under
    ``keys``, its speaker one of ``roles`` (a name -> role map; default: :data:`ROLES` as they are)."""
    roles = roles or {role: role for role in ROLES}
    speaker, text = keys
    messages = row.get(field)
    if not isinstance(messages, list) or not messages:
        raise row.error(field, f"must be a non-empty list of turns, got {_describe(messages)}")
    turns = []
    for number, message in enumerate(messages):
        where = f"{field}[{number}]"
        if not isinstance(message, dict):
            raise row.error(where, f"must be an object with '{speaker}' and '{text}', got {_describe(message)}")
        name = message.get(speaker)
        if not isinstance(name, str) or name not in roles:
            raise row.error(f"{where}.{speaker}", f"must be one of {', '.join(roles)}, got {_describe(name)}")
        turns.append({"role": roles[name], "content": row.text(f"{where}.{text}", message.get(text))})
    return turns


def _conversation_example(row: _Row, field: str, turns: list[dict[str, str]], *, learn_history: bool) -> Example:
    """A conversation's last assistant turn as the answer (the one scored), the turns before it as its prompt."""
    if [turn["role"] for turn in turns[-2:]] != ["user", "assistant"]:
        raise row.error(field, "must end with a user turn and the assistant's answer to it (the answer scored)")
    return Example(turns[-2]["content"], [turns[-1]["content"]], history=turns[:-2], learn_history=learn_history)


def _parse_messages(row: _Row) -> Example:
    return _conversation_example(row, "messages", _turns(row, "messages"), learn_history=True)


def _parse_sharegpt(row: _Row) -> Example:
    turns = _turns(row, "conversations", keys=("from", "value"), roles=SHAREGPT_ROLES)
    return _conversation_example(row, "conversations", turns, learn_history=True)


def _parse_prompt_completion(row: _Row) -> Example:
    """TRL's prompt-completion rows: the completion alone is learned, as TRL's ``completion_only_loss``."""
    if isinstance(row.get("prompt"), list) or isinstance(row.get("completion"), list):  # conversational: turns
        turns = _turns(row, "prompt") + _turns(row, "completion")
        return _conversation_example(row, "completion", turns, learn_history=False)
    return Example(row.text("prompt"), [row.text("completion")])


def _parse_alpaca(row: _Row) -> Example:
    """The instruction, then its input (if any) after a blank line, as the prompt; the output learned."""
    given = row.data.get("input") or ""  # missing, null (an empty CSV or parquet cell) or empty: no input
    if not isinstance(given, str):
        raise row.error("input", f"must be a string (empty for none), got {_describe(given)}")
    instruction = row.text("instruction")
    return Example(f"{instruction}\n\n{given}" if given.strip() else instruction, [row.text("output")])


def _parse_text(row: _Row) -> Example:
    return Example("", [row.text("text")], task=TEXT)


_PARSERS: dict[str, Callable[[_Row], Example]] = {
    "qa": _parse_qa,
    "nq": _parse_nq,
    "squad": _parse_squad,
    "toolbench": _parse_toolbench,
    "gsm8k": _parse_gsm8k,
    "messages": _parse_messages,
    "sharegpt": _parse_sharegpt,
    "prompt_completion": _parse_prompt_completion,
    "alpaca": _parse_alpaca,
    "text": _parse_text,
}
_SIGNATURES: dict[str, Callable[[dict[str, Any]], bool]] = {
    "qa": lambda row: "question" in row and isinstance(row.get("answers"), list),
    "nq": lambda row: "question" in row and isinstance(row.get("answer"), list),
    "squad": lambda row: "question" in row and isinstance(row.get("answers"), dict),
    "toolbench": lambda row: "query" in row and "relevant APIs" in row,
    "gsm8k": lambda row: "question" in row and isinstance(row.get("answer"), str),
    "messages": lambda row: isinstance(row.get("messages"), list),
    "sharegpt": lambda row: isinstance(row.get("conversations"), list),
    "prompt_completion": lambda row: "prompt" in row and "completion" in row,
    "alpaca": lambda row: "instruction" in row and "output" in row,
    "text": lambda row: "text" in row,
}


def _infer_format(row: dict[str, Any], where: str) -> str:
    matches = [fmt for fmt, matches in _SIGNATURES.items() if matches(row)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        found = f"fits several schemas ({', '.join(matches)})"
    else:
        found = "fits none of the schemas: " + "; ".join(f"{fmt} {schema}" for fmt, schema in SCHEMAS.items())
    raise DatasetError(
        f"{where}: cannot tell the dataset schema from the fields {sorted(row)}: it {found}. "
        f"Set --dataset_format (format= in Python) to one of {', '.join(FORMATS)}"
    )


def parse_rows(rows: Sequence[tuple[str, Any]], fmt: str | None) -> list[Example]:
    examples = []
    for where, row in rows:
        if not isinstance(row, dict):
            raise DatasetError(f"{where}: expected a JSON object, got {_describe(row)}. Write each row as an object")
        fmt = fmt or _infer_format(row, where)
        examples.append(_PARSERS[fmt](_Row(row, where, fmt)))
    return examples


# ----------------------------------------------------------------------------------------------------------------
# Local files


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


def load_file(path: Path, fmt: str | None) -> list[Example]:
    readers = {".jsonl": _read_jsonl, ".json": _read_json}
    if path.suffix not in readers:
        raise DatasetError(
            f"{path}: unsupported file type; use a .json file (a list of objects), a .jsonl, .parquet or .csv file"
        )
    if not path.is_file():
        raise DatasetError(f"{path}: no such file. Pass the path of an existing .json or .jsonl file")
    rows = readers[path.suffix](path)
    if not rows:
        raise DatasetError(f"{path}: the file holds no rows. Add rows like {SCHEMAS[fmt or 'qa']}")
    return parse_rows(rows, fmt)
