"""Self-rehearsal: general questions answered by the base model itself, mixed into the training data.

Fine-tuned on a task whose answers are short invented names, every method tried here (MEFT, LoRA, the parallel
adapter) learns "a question -> a short invented name" for *every* question, and forgets what the base model knew
(see BENCHMARKS.md, quality). The classic remedy is to keep training on data like the base model's own (replay,
rehearsal); with no pretraining corpus at hand, the base model's own greedy answers to general questions serve
(self-synthesized rehearsal, Huang et al., ACL 2024). :data:`QUESTIONS` are such questions; none of them is a
question of the retention probe (:mod:`meft_ds.probe`), whose score would otherwise measure the training data.
They are of the same kind as the probe's (capitals, authors, dates, science), so the probe then measures whether
general knowledge of that kind survives, not whether every kind does.

``launch/train.py --rehearsal N`` answers the first N with the untrained model on its device (greedy, as the probe
is answered) and adds them to the training examples, before a resumed run loads its checkpoint (so a resumed run
trains on the same answers).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from meft_ds.data import Example
from meft_ds.evaluation import evaluate_generation

NEW_TOKENS = 24  # one sentence, as the probe's answers

QUESTIONS: tuple[str, ...] = (
    "What is the capital of Peru?",
    "What is the capital of Mexico?",
    "What is the capital of Brazil?",
    "What is the capital of Chile?",
    "What is the capital of Colombia?",
    "What is the capital of Cuba?",
    "What is the capital of Nigeria?",
    "What is the capital of Ethiopia?",
    "What is the capital of Morocco?",
    "What is the capital of Ghana?",
    "What is the capital of Iran?",
    "What is the capital of Iraq?",
    "What is the capital of Saudi Arabia?",
    "What is the capital of Pakistan?",
    "What is the capital of Vietnam?",
    "What is the capital of Indonesia?",
    "What is the capital of the Philippines?",
    "What is the capital of Finland?",
    "What is the capital of Denmark?",
    "What is the capital of the Netherlands?",
    "What is the capital of Belgium?",
    "What is the capital of Switzerland?",
    "What is the capital of Hungary?",
    "What is the capital of the Czech Republic?",
    "What is the capital of Romania?",
    "What is the capital of Ukraine?",
    "What is the capital of Iceland?",
    "What is the capital of New Zealand?",
    "What is the capital of Nepal?",
    "What is the capital of Bangladesh?",
    "Who wrote The Great Gatsby?",
    "Who wrote Moby-Dick?",
    "Who wrote Crime and Punishment?",
    "Who wrote Les Miserables?",
    "Who wrote A Tale of Two Cities?",
    "Who wrote The Divine Comedy?",
    "Who wrote Faust?",
    "Who wrote The Old Man and the Sea?",
    "Who wrote The Adventures of Tom Sawyer?",
    "Who wrote Frankenstein?",
    "Who wrote Dracula?",
    "Who wrote Jane Eyre?",
    "Who wrote The Lord of the Rings?",
    "Who wrote Alice's Adventures in Wonderland?",
    "Who created Sherlock Holmes?",
    "Who discovered penicillin?",
    "Who invented the telephone?",
    "Who invented the light bulb?",
    "Who formulated the laws of motion and universal gravitation?",
    "Who painted the ceiling of the Sistine Chapel?",
    "Who composed the Fifth Symphony?",
    "Who was the first person to walk on the Moon?",
    "Who proposed the theory of evolution by natural selection together with Darwin?",
    "In what year did World War I end?",
    "In what year did World War II begin?",
    "In what year was the Magna Carta signed?",
    "In what year was the Battle of Hastings?",
    "In what year did the Russian Revolution take place?",
    "In what year did the Soviet Union collapse?",
    "What is the chemical symbol for iron?",
    "What is the chemical symbol for silver?",
    "What is the chemical symbol for sodium?",
    "What is the chemical symbol for oxygen?",
    "At what temperature in Celsius does water boil at sea level?",
    "At what temperature in Celsius does water freeze?",
    "What is the largest mammal?",
    "What is the hardest natural substance?",
    "Which planet is farthest from the Sun?",
    "What is the smallest planet in the Solar System?",
    "What star is at the centre of the Solar System?",
    "How many days are there in a leap year?",
    "Which organ pumps blood through the body?",
    "How many legs does a spider have?",
    "What is the largest desert in the world?",
    "What is the largest continent?",
    "What is the longest river in South America?",
    "What is the currency of the United Kingdom?",
    "What is the currency of the United States?",
    "What language is mainly spoken in Mexico?",
    "What is the official language of Germany?",
)


def rehearsal_examples(model: nn.Module, tokenizer: Any, count: int, **kwargs: Any) -> list[Example]:
    """The first ``count`` of :data:`QUESTIONS`, each with ``model``'s greedy answer (its first line, as evaluation
    extracts it) as the target; a question answered with nothing is left out. ``kwargs`` go to
    :func:`meft_ds.evaluation.evaluate_generation` (e.g. ``across_ranks``)."""
    if not 0 < count <= len(QUESTIONS):
        raise ValueError(f"rehearsal count must be 1..{len(QUESTIONS)} (the built-in general questions), got {count}")
    questions = [Example(question, [""]) for question in QUESTIONS[:count]]  # no reference: the model gives it
    result = evaluate_generation(model, tokenizer, questions, max_new_tokens=NEW_TOKENS, **kwargs)
    return [Example(p["prompt"], [p["prediction"]]) for p in result["predictions"] if p["prediction"]]
