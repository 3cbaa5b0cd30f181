"""Knowledge-retention probe: general questions the built-in base model answers correctly, asked after training.

Fine-tuning on new facts can overwrite what the base model knew. The probe measures that: :data:`CANDIDATES` are
general questions (capitals, authors, well-known dates, planets, painters), each with the short answers that count.
At build time (``python -m meft_ds.probe --build``, greedy decoding, fp32, as the launcher evaluates) the built-in
SmolLM2-135M-Instruct answers every candidate; the ones it gets right are stored in ``probe_questions.json`` next to
this file, with the model and the rule. A probe answer is right when one of its answers appears, as whole words
after SQuAD normalisation, in the first line of the generated text: the base model answers in sentences ("The capital
of France is Paris."), a model fine-tuned on short answers in a word, and both are right.

``python -m meft_ds.probe --check bfloat16`` asks the kept questions again with the untrained model in another dtype:
how many survive a change of rounding alone: the probe's noise, against which a retention figure is read (in bf16 39
of 43 on an Intel Xeon with AMX, 42 on an AVX-512 EPYC, where fp32 answers all 43: a small model's greedy sentence
turns on small differences, bf16's rounding on the CPU's kernels, and some answers hold
the name only by luck, e.g. "The Berlin Wall was built by the Iron Curtain in 1989").

``launch/train.py`` asks the kept questions before and after training and reports the fraction of those right before
that are still right after (:func:`retained`), beside the exact match on the new facts. tests/test_quality.py checks
that the built-in model still answers every kept question.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from meft_ds.data import Example
from meft_ds.evaluation import evaluate_generation
from meft_ds.metrics import normalize_answer

PROBE_FILE = Path(__file__).with_name("probe_questions.json")
NEW_TOKENS = 24  # a sentence: "The capital of Australia is Canberra."

# (question, accepted answers): a probe answer is right when one of them appears in it as whole words
CANDIDATES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What is the capital of France?", ("Paris",)),
    ("What is the capital of Germany?", ("Berlin",)),
    ("What is the capital of Italy?", ("Rome",)),
    ("What is the capital of Spain?", ("Madrid",)),
    ("What is the capital of Japan?", ("Tokyo",)),
    ("What is the capital of Russia?", ("Moscow",)),
    ("What is the capital of Egypt?", ("Cairo",)),
    ("What is the capital of the United Kingdom?", ("London",)),
    ("What is the capital of China?", ("Beijing",)),
    ("What is the capital of Canada?", ("Ottawa",)),
    ("What is the capital of Australia?", ("Canberra",)),
    ("What is the capital of Greece?", ("Athens",)),
    ("What is the capital of Portugal?", ("Lisbon",)),
    ("What is the capital of Ireland?", ("Dublin",)),
    ("What is the capital of Austria?", ("Vienna",)),
    ("What is the capital of Norway?", ("Oslo",)),
    ("What is the capital of Sweden?", ("Stockholm",)),
    ("What is the capital of Poland?", ("Warsaw",)),
    ("What is the capital of India?", ("New Delhi", "Delhi")),
    ("What is the capital of Kenya?", ("Nairobi",)),
    ("What is the capital of Thailand?", ("Bangkok",)),
    ("What is the capital of South Korea?", ("Seoul",)),
    ("What is the capital of Turkey?", ("Ankara",)),
    ("What is the capital of Argentina?", ("Buenos Aires",)),
    ("Who wrote Romeo and Juliet?", ("Shakespeare",)),
    ("Who wrote Hamlet?", ("Shakespeare",)),
    ("Who wrote the novel 1984?", ("Orwell",)),
    ("Who wrote Pride and Prejudice?", ("Austen",)),
    ("Who wrote War and Peace?", ("Tolstoy",)),
    ("Who wrote Don Quixote?", ("Cervantes",)),
    ("Who wrote the Harry Potter books?", ("Rowling",)),
    ("Who wrote the Odyssey?", ("Homer",)),
    ("Who wrote On the Origin of Species?", ("Darwin",)),
    ("Who painted the Mona Lisa?", ("Leonardo", "da Vinci")),
    ("Who painted The Starry Night?", ("van Gogh",)),
    ("Who developed the theory of relativity?", ("Einstein",)),
    ("Who was the first President of the United States?", ("Washington",)),
    ("In what year did World War II end?", ("1945",)),
    ("In what year did World War I begin?", ("1914",)),
    ("In what year did Columbus first reach the Americas?", ("1492",)),
    ("In what year did humans first land on the Moon?", ("1969",)),
    ("In what year was the American Declaration of Independence signed?", ("1776",)),
    ("In what year did the Berlin Wall fall?", ("1989",)),
    ("In what year did the French Revolution begin?", ("1789",)),
    ("In what year did the Titanic sink?", ("1912",)),
    ("What is the largest planet in the Solar System?", ("Jupiter",)),
    ("Which planet is known as the Red Planet?", ("Mars",)),
    ("Which planet is closest to the Sun?", ("Mercury",)),
    ("Which planet has the most famous rings?", ("Saturn",)),
    ("What is the largest ocean on Earth?", ("Pacific",)),
    ("What is the tallest mountain in the world?", ("Everest",)),
    ("What is the chemical symbol for gold?", ("Au",)),
    ("What is the chemical formula of water?", ("H2O",)),
    ("What gas do plants absorb from the air for photosynthesis?", ("carbon dioxide", "CO2")),
    ("How many continents are there on Earth?", ("seven", "7")),
    ("What is the currency of Japan?", ("yen",)),
    ("What language is mainly spoken in Brazil?", ("Portuguese",)),
    ("What is the largest country in the world by area?", ("Russia",)),
    ("On which continent is Egypt?", ("Africa",)),
    ("What is the longest river in Africa?", ("Nile",)),
)


def is_right(prediction: str, answers: Sequence[str]) -> bool:
    """Whether one of ``answers`` appears, as whole words after SQuAD normalisation, in ``prediction``."""
    text = f" {normalize_answer(prediction)} "
    return any(f" {normalize_answer(answer)} " in text for answer in answers)


def as_examples(questions: Sequence[tuple[str, Sequence[str]]]) -> list[Example]:
    return [Example(question, list(answers)) for question, answers in questions]


def probe_examples(path: Path = PROBE_FILE) -> list[Example]:
    """The kept questions (those the built-in base model answers right), as :class:`meft_ds.data.Example`."""
    kept = json.loads(path.read_text())["questions"]
    return as_examples([(q["question"], q["answers"]) for q in kept])


def answer_probe(model: nn.Module, tokenizer: Any, examples: Sequence[Example], **kwargs: Any) -> list[dict[str, Any]]:
    """Greedy answers to the probe's questions (``kwargs`` go to :func:`meft_ds.evaluation.evaluate_generation`,
    e.g. ``across_ranks``), each with ``right``."""
    result = evaluate_generation(model, tokenizer, examples, max_new_tokens=NEW_TOKENS, **kwargs)
    return [{**p, "right": is_right(p["prediction"], p["answers"])} for p in result["predictions"]]


def retained(before: Sequence[dict[str, Any]] | None, after: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Of the questions answered right ``before`` training (``None``: all, as the built-in model answers every kept
    question), the fraction still right ``after``."""
    known = [i for i, answer in enumerate(before or after) if before is None or answer["right"]]
    kept = [i for i in known if after[i]["right"]]
    return {"known": len(known), "still_right": len(kept), "fraction": len(kept) / len(known) if known else None}


def build(model: nn.Module, tokenizer: Any, model_name: str, path: Path) -> dict[str, Any]:
    """Ask every candidate and store the ones ``model`` answers right (with what it answered) in ``path``."""
    answers = answer_probe(model, tokenizer, as_examples(CANDIDATES), batch_size=16)
    kept = [
        {"question": a["prompt"], "answers": a["answers"], "base_answer": a["prediction"]}
        for a in answers
        if a["right"]
    ]
    record = {
        "model": model_name,
        "rule": "greedy, fp32, the launcher's chat prompt; right = an answer appears as whole words in the first line",
        "max_new_tokens": NEW_TOKENS,
        "candidates": len(CANDIDATES),
        "questions": kept,
    }
    path.write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv: list[str] | None = None) -> None:
    import torch

    from meft_ds.models import BUILTIN_MODEL, load_model_and_tokenizer

    parser = argparse.ArgumentParser(description="Build the retention probe (keep the questions the model knows), or "
                                     "ask its kept questions again.")  # fmt: skip
    parser.add_argument("--build", action="store_true", help=f"rewrite {PROBE_FILE.name}")
    parser.add_argument(
        "--check",
        choices=("float32", "bfloat16", "float16"),
        help="ask the kept questions with the built-in model in this dtype and count those still answered right: "
        "what rounding alone costs the probe, with no training",
    )
    args = parser.parse_args(argv)
    if args.build == bool(args.check):
        parser.error("pass --build or --check DTYPE")
    model, tokenizer = load_model_and_tokenizer(None, dtype=getattr(torch, args.check or "float32"))
    if args.build:
        record = build(model, tokenizer, BUILTIN_MODEL, PROBE_FILE)
        print(f"kept {len(record['questions'])} of {record['candidates']} questions in {PROBE_FILE}")
        return
    answers = answer_probe(model, tokenizer, probe_examples(), batch_size=16)
    result = retained(None, answers)
    print(f"{args.check}: {result['still_right']} of {result['known']} kept questions answered right "
          f"({result['fraction']:.0%})")  # fmt: skip
    for answer in answers:
        if not answer["right"]:
            print(f"  {answer['prompt']} -> {answer['prediction']!r}")


if __name__ == "__main__":
    main()
