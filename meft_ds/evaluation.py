"""Generation-based evaluation: greedy answers to held-out examples, scored per task (EM/F1, IoU, accuracy)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from meft_ds.data import Example, format_prompt, has_chat_template
from meft_ds.metrics import score

# Generation budget per task when none is given: GSM8K answers are whole worked solutions, ToolBench a list of calls.
NEW_TOKENS = {"qa": 16, "toolbench": 64, "gsm8k": 256}


def extract_answer(task: str, generated: str) -> str:
    """The answer in the generated text: its first line for one-line answers (QA, ToolBench), since a model may go
    on after it; the whole text for GSM8K, whose solution spans lines and whose metric finds the ``####`` number."""
    text = generated.strip()
    return text if task == "gsm8k" else text.split("\n", 1)[0].strip()


@contextmanager
def _generation_mode(model: nn.Module, tokenizer: Any) -> Iterator[None]:
    """Eval mode, left padding and a pad token (EOS when missing) for batched generation; all restored after."""
    modes = {module: module.training for module in model.modules()}
    padding_side, pad_token = tokenizer.padding_side, tokenizer.pad_token
    model.eval()
    tokenizer.padding_side = "left"  # generation continues from the last column, so prompts must end there
    if pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training
        tokenizer.padding_side, tokenizer.pad_token = padding_side, pad_token


def _stop_token_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """The model's own EOS ids (e.g. a chat model's end-of-turn) plus the tokenizer's, which training appends."""
    config_ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = config_ids if isinstance(config_ids, list) else [config_ids]
    return list(dict.fromkeys(i for i in [*ids, tokenizer.eos_token_id] if i is not None))


def _generate(model: nn.Module, tokenizer: Any, prompts: list[str], max_new_tokens: int) -> list[str]:
    device = next(model.parameters()).device
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not has_chat_template(tokenizer))
    batch = {key: value.to(device) for key, value in batch.items()}
    output = model.generate(
        **batch,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=_stop_token_ids(model, tokenizer),
    )
    return tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def evaluate_generation(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Greedy-decode an answer to every example (prompts as in training, :func:`meft_ds.data.format_prompt`) and
    score it with :func:`meft_ds.metrics.score`. ``max_new_tokens`` defaults to the examples' task budget
    (:data:`NEW_TOKENS`).

    Returns the mean of each metric (``exact_match`` and ``f1`` for QA, ``iou`` for ToolBench, ``accuracy`` for
    GSM8K), ``n`` and ``predictions`` (``{"prompt", "prediction", "answers"}`` per example). The model runs in
    eval mode under ``torch.no_grad()``; its train/eval modes and the tokenizer's padding are restored after.
    """
    if not examples:
        raise ValueError("evaluate_generation needs at least one example")
    if max_new_tokens is None:
        max_new_tokens = max(NEW_TOKENS[example.task] for example in examples)
    totals: dict[str, list[float]] = defaultdict(list)
    predictions = []
    with _generation_mode(model, tokenizer), torch.no_grad():
        for start in tqdm(range(0, len(examples), batch_size), desc="evaluate", disable=not show_progress):
            batch = examples[start : start + batch_size]
            prompts = [format_prompt(tokenizer, example) for example in batch]
            for example, generated in zip(batch, _generate(model, tokenizer, prompts, max_new_tokens), strict=True):
                prediction = extract_answer(example.task, generated)
                for metric, value in score(example.task, prediction, example.answers).items():
                    totals[metric].append(value)
                predictions.append({"prompt": example.prompt, "prediction": prediction, "answers": example.answers})
    means = {metric: sum(values) / len(values) for metric, values in totals.items()}
    return {**means, "n": len(examples), "predictions": predictions}


def format_scores(result: dict[str, Any] | None) -> str:
    """One line of an evaluation's mean scores, e.g. ``exact_match 0.690, f1 0.742``."""
    if not result:
        return "skipped"
    return ", ".join(f"{key} {value:.3f}" for key, value in result.items() if isinstance(value, float))
