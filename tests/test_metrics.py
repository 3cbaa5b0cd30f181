"""Metrics on known cases: SQuAD's EM/F1, API-call IoU, GSM8K final-number accuracy, the task dispatcher."""

from __future__ import annotations

import pytest

from meft_ds.metrics import (
    api_call_iou,
    exact_match,
    f1,
    final_number,
    gsm8k_accuracy,
    normalize_answer,
    parse_api_calls,
    score,
)

GSM8K_REFERENCE = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72"


def test_normalize_answer_is_squads() -> None:
    assert normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert normalize_answer("an apple, a pear") == "apple pear"
    assert normalize_answer("Theatre") == "theatre"  # articles only as whole words


@pytest.mark.parametrize(
    ("prediction", "answers", "em", "token_f1"),
    [
        ("the Denver Broncos", ["Denver Broncos", "Broncos"], 1.0, 1.0),
        ("Broncos", ["Denver Broncos"], 0.0, 2 / 3),  # precision 1, recall 1/2
        ("Broncos", ["Denver Broncos", "Broncos"], 1.0, 1.0),  # the best answer counts
        ("Carolina Panthers", ["Denver Broncos"], 0.0, 0.0),
        ("Denver Broncos won easily", ["Denver Broncos"], 0.0, 2 * 0.5 / 1.5),  # precision 1/2, recall 1
        ("", ["Denver Broncos"], 0.0, 0.0),
        ("the", ["a"], 1.0, 1.0),  # both normalize to empty
    ],
)
def test_exact_match_and_f1_on_squad_cases(prediction: str, answers: list[str], em: float, token_f1: float) -> None:
    assert exact_match(prediction, answers) == em
    assert f1(prediction, answers) == pytest.approx(token_f1)


def test_parse_api_calls() -> None:
    assert parse_api_calls("Olato Quotes.Love Quote; NFTs by address.getNFTs_byaddress") == {
        "olato quotes.love quote",
        "nfts by address.getnfts_byaddress",
    }
    listed = "- Olato Quotes.Love Quote\n2. olato  quotes.SUCCESS quote.\n\n`weather(city = Paris, days=3)`"
    assert parse_api_calls(listed) == {
        "olato quotes.love quote",
        "olato quotes.success quote",
        "weather(city=paris,days=3)",
    }
    assert parse_api_calls('search(query="a; b", page=1)') == {'search(query="a; b",page=1)'}  # ; inside arguments
    assert parse_api_calls("  \n ; ") == set()


@pytest.mark.parametrize(
    ("prediction", "reference", "iou"),
    [
        ("Quotes.Love; Quotes.Success", "Quotes.Success; Quotes.Love", 1.0),
        ("quotes.love", "Quotes.Love; Quotes.Success", 0.5),
        ("Quotes.Love; Weather.Today", "Quotes.Love; Quotes.Success", 1 / 3),
        ("Weather.Today", "Quotes.Love", 0.0),
        ("", "Quotes.Love", 0.0),
        ("", "", 1.0),
        ("get(a=1, b=2)", "get(a=1,b=2)", 1.0),
        ("get(a=1, b=3)", "get(a=1, b=2)", 0.0),
    ],
)
def test_api_call_iou(prediction: str, reference: str, iou: float) -> None:
    assert api_call_iou(prediction, reference) == pytest.approx(iou)


@pytest.mark.parametrize(
    ("text", "number"),
    [
        (GSM8K_REFERENCE, 72.0),
        ("She earned $1,250 in total.\n#### 1,250", 1250.0),
        ("#### -3", -3.0),
        ("48 + 24 = 72, so the answer is 72.", 72.0),  # no ####: the last number
        ("#### 7 apples, not 8", 7.0),  # the first number after ####
        ("It is 0.5 of 10", 10.0),
        ("no number here", None),
    ],
)
def test_final_number(text: str, number: float | None) -> None:
    assert final_number(text) == number


@pytest.mark.parametrize(
    ("prediction", "accuracy"),
    [(GSM8K_REFERENCE, 1.0), ("#### 72", 1.0), ("The answer is 72.", 1.0), ("#### 71", 0.0), ("I do not know", 0.0)],
)
def test_gsm8k_accuracy(prediction: str, accuracy: float) -> None:
    assert gsm8k_accuracy(prediction, GSM8K_REFERENCE) == accuracy


def test_score_dispatches_per_task() -> None:
    assert score("qa", "Broncos", ["Denver Broncos"]) == {"exact_match": 0.0, "f1": pytest.approx(2 / 3)}
    assert score("toolbench", "a.b", ["a.b; c.d", "a.b"]) == {"iou": 1.0}
    assert score("gsm8k", "#### 72", [GSM8K_REFERENCE]) == {"accuracy": 1.0}
    with pytest.raises(ValueError, match="unknown task 'math': use one of qa, toolbench, gsm8k"):
        score("math", "1", ["1"])
