"""Datasets: the synthetic facts set and tokenization (the sources they load from: test_data_sources.py)."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tiny_models import CHATML, word_tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from meft_ds import models
from meft_ds.data import (
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


def test_truncation_keeps_the_answer_and_the_end_of_the_prompt_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    tokenizer = word_tokenizer(chat=False)
    example = load_examples("facts", limit=1)
    with caplog.at_level(logging.WARNING, logger="meft_ds"):
        (full,) = tokenize_for_training(example, tokenizer, max_length=256)
    assert not caplog.records
    length = len(full["input_ids"])
    (cut,) = tokenize_for_training([*example, Example("Why?", answers=["x"])], tokenizer, max_length=length - 3)[:1]
    assert cut["input_ids"] == full["input_ids"][3:] and cut["labels"] == full["labels"][3:]
    assert [r.getMessage() for r in caplog.records] == [
        f"meft_ds: 1 of 2 examples are longer than max_length={length - 3} tokens (the longest {length}): their "
        f"prompts lose their first tokens. Fix: raise max_length (train.py --max_length) to {length} to keep them "
        "whole."
    ]
    caplog.clear()
    long = Example("Who?", answers=[" ".join(["Zembrook"] * 10)])
    tokenize_for_training([long, Example("Why?", answers=["x"])], tokenizer, max_length=8)
    assert "(1 of them answers that alone fill it, whose end is cut too)" in caplog.text
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
