"""Scores for generated answers: SQuAD-style EM/F1 (NQ, SQuAD, facts), API-call IoU (ToolBench), GSM8K accuracy.

Every function takes the model's answer text and the reference text(s); :func:`score` picks the metrics of a task.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

TASKS = ("qa", "toolbench", "gsm8k")

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_LIST_MARKER = re.compile(r"^(?:[-*•]|\d+[.)])\s+")
_SPACE_AROUND_SYNTAX = re.compile(r"\s*([(),=])\s*")


def normalize_answer(text: str) -> str:
    """The official SQuAD normalization: lowercase, drop punctuation and articles, collapse whitespace."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalized prediction equals any normalized answer, else 0.0."""
    predicted = normalize_answer(prediction)
    return max((float(predicted == normalize_answer(answer)) for answer in answers), default=0.0)


def _token_f1(prediction: str, answer: str) -> float:
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(answer).split()
    if not predicted or not expected:  # SQuAD's rule: an empty side scores 1 only against another empty side
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def f1(prediction: str, answers: Sequence[str]) -> float:
    """Token-level F1 between normalized texts, the best over the answers."""
    return max((_token_f1(prediction, answer) for answer in answers), default=0.0)


def _split_calls(text: str) -> list[str]:
    """Split at ``;`` and newlines that are not inside parentheses (arguments may contain both)."""
    calls, current, depth = [], [], 0
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char in ";\n" and depth <= 0:
            calls.append("".join(current))
            current, depth = [], 0
        else:
            current.append(char)
    calls.append("".join(current))
    return calls


def _normalize_call(call: str) -> str:
    call = _LIST_MARKER.sub("", call.strip().strip("`").strip())
    call = " ".join(call.lower().split()).rstrip(".")
    return _SPACE_AROUND_SYNTAX.sub(r"\1", call)


def parse_api_calls(text: str) -> set[str]:
    """The set of API calls in ``text``: calls are separated by ``;`` or newlines, each written ``tool.api`` or
    ``name(arg=value, ...)``. Case, whitespace, list markers (``-``, ``1.``) and a trailing period do not matter."""
    return {call for call in map(_normalize_call, _split_calls(text)) if call}


def api_call_iou(prediction: str, reference: str) -> float:
    """Intersection over union of the predicted and reference API-call sets (1.0 when both are empty)."""
    predicted, expected = parse_api_calls(prediction), parse_api_calls(reference)
    union = predicted | expected
    return len(predicted & expected) / len(union) if union else 1.0


def final_number(text: str) -> float | None:
    """The answer number of a GSM8K-style solution: the first number after ``####`` if there is one, else the
    last number in the text (thousands separators allowed). None when there is no number."""
    head, marker, tail = text.partition("####")
    numbers = _NUMBER.findall(tail)[:1] if marker else _NUMBER.findall(head)[-1:]
    return float(numbers[0].replace(",", "")) if numbers else None


def gsm8k_accuracy(prediction: str, reference: str) -> float:
    """1.0 if the final number of the prediction equals the reference's (``#### <number>``), else 0.0."""
    predicted, expected = final_number(prediction), final_number(reference)
    return float(predicted is not None and expected is not None and abs(predicted - expected) < 1e-6)


def score(task: str, prediction: str, answers: Sequence[str]) -> dict[str, float]:
    """The metrics of one prediction: ``exact_match`` and ``f1`` for "qa", ``iou`` for "toolbench", ``accuracy``
    for "gsm8k"; each the best over the reference answers."""
    if task == "qa":
        return {"exact_match": exact_match(prediction, answers), "f1": f1(prediction, answers)}
    if task == "toolbench":
        return {"iou": max((api_call_iou(prediction, answer) for answer in answers), default=0.0)}
    if task == "gsm8k":
        return {"accuracy": max((gsm8k_accuracy(prediction, answer) for answer in answers), default=0.0)}
    raise ValueError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
