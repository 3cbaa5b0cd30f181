"""Evaluation: greedy answers to held-out examples, scored per task (EM/F1, IoU, accuracy), and the teacher-forced loss
per learned token (plain texts are scored by it, :func:`evaluate_examples`).

With ``across_ranks=True`` every data-parallel rank generates a share of the batches and rank 0's result holds all
answers, so that a many-rank run evaluates in 1/world_size of the time instead of keeping the other ranks waiting.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed
from torch import nn
from tqdm import tqdm

from meft_ds.data import IGNORE_INDEX, Example, collate, format_prompt, has_chat_template, tokenize_for_training
from meft_ds.inject import adapters
from meft_ds.metrics import score
from meft_ds.schemas import TEXT

logger = logging.getLogger("meft_ds.evaluation")

# Generation budget per task when none is given: GSM8K answers are whole worked solutions, ToolBench a list of calls.
NEW_TOKENS = {"qa": 16, "toolbench": 64, "gsm8k": 256}


def extract_answer(task: str, generated: str) -> str:
    """The answer in the generated text: its first line for one-line answers (QA, ToolBench), since a model may go
    on after it; the whole text for GSM8K, whose solution spans lines and whose metric finds the ``####`` number."""
    text = generated.strip()
    return text if task == "gsm8k" else text.split("\n", 1)[0].strip()


def _contiguous_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """A forward pre-hook for the output head: its input made contiguous. Generation's first forward scores only the
    last position, ``hidden[:, -1:, :]``, whose strides keep ``torch.matmul`` from folding the batch into one matrix
    product when the head's weight is frozen (as under adapters): it multiplies prompt by prompt against the weight
    expanded over the batch instead, and in bf16 on a CPU copies that expansion first (32 prompts, SmolLM2's
    49152 x 576 head: 1.8 GB and 2.8 s per batch, against 8 ms folded; fp32: 167 ms against 24 ms; torch 2.13 on an
    Intel Xeon with AMX). The copy made here is one row per prompt."""
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


@contextmanager
def _generation_mode(model: nn.Module, tokenizer: Any) -> Iterator[None]:
    """Eval mode, left padding and a pad token (EOS when missing) for batched generation, and the output head's input
    made contiguous (:func:`_contiguous_input`); all restored after."""
    modes = {module: module.training for module in model.modules()}
    padding_side, pad_token = tokenizer.padding_side, tokenizer.pad_token
    model.eval()
    tokenizer.padding_side = "left"  # generation continues from the last column, so prompts must end there
    if pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    hook = head.register_forward_pre_hook(_contiguous_input) if isinstance(head, nn.Module) else None
    try:
        yield
    finally:
        if hook is not None:
            hook.remove()
        for module, training in modes.items():
            module.training = training
        tokenizer.padding_side, tokenizer.pad_token = padding_side, pad_token


def _stop_token_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """The model's own EOS ids (e.g. a chat model's end-of-turn) plus the tokenizer's, which training appends."""
    config_ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = config_ids if isinstance(config_ids, list) else [config_ids]
    return list(dict.fromkeys(i for i in [*ids, tokenizer.eos_token_id] if i is not None))


def _generate(
    model: nn.Module, tokenizer: Any, prompts: list[str], max_new_tokens: int, *, synced: bool = False
) -> list[str]:
    device = next(model.parameters()).device
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not has_chat_template(tokenizer))
    batch = {key: value.to(device) for key, value in batch.items()}
    extra = {"synced_gpus": True} if synced else {}  # ranks that finish early keep running forwards for the others
    output = model.generate(
        **batch,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=_stop_token_ids(model, tokenizer),
        **extra,
    )
    return tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def forwards_need_every_rank(model: nn.Module) -> bool:
    """Whether the model's forward runs collectives, so that every rank must run as many forwards as the others:
    under ZeRO-3 each layer gathers its parameters (they carry DeepSpeed's ``ds_id``), and adapters over a sharded row
    store fetch rows from their owners."""
    return any(hasattr(p, "ds_id") for p in model.parameters()) or any(a.store.is_shard for a in adapters(model))


def batch_plan(num_examples: int, batch_size: int, rank: int, world_size: int, *, lockstep: bool) -> list[range | None]:
    """The batches (ranges of example indices) that ``rank`` generates. Batch ``b`` of the one-rank order goes to rank
    ``b % world_size``, so every batch holds the examples, and gets the padding, it would get on one rank: the answers
    are the one-rank answers. In ``lockstep`` every rank runs as many batches as the busiest one; the extra ones are
    ``None``, a batch run only for the collectives in its forwards, whose answers are dropped."""
    batches = [range(start, min(start + batch_size, num_examples)) for start in range(0, num_examples, batch_size)]
    mine: list[range | None] = list(batches[rank::world_size])
    if lockstep:
        mine += [None] * (math.ceil(len(batches) / world_size) - len(mine))
    return mine


def _ranks(across_ranks: bool) -> tuple[int, int]:
    if across_ranks and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def evaluate_generation(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    show_progress: bool = False,
    across_ranks: bool = False,
) -> dict[str, Any]:
    """Greedy-decode an answer to every example (prompts as in training, :func:`meft_ds.data.format_prompt`) and
    score it with :func:`meft_ds.metrics.score`. ``max_new_tokens`` defaults to the examples' task budget
    (:data:`NEW_TOKENS`).

    ``across_ranks=True`` (every rank of the initialized process group calls it, with the same examples) shares the
    batches out (:func:`batch_plan`) and gathers the answers: every rank returns the result one rank would have
    computed alone. Where forwards run collectives (:func:`forwards_need_every_rank`: ZeRO-3, a sharded row store)
    the ranks run equally many batches and generate with ``synced_gpus``.

    Returns the mean of each metric (``exact_match`` and ``f1`` for QA, ``iou`` for ToolBench, ``accuracy`` for
    GSM8K), ``n`` and ``predictions`` (``{"prompt", "prediction", "answers"}`` per example). The model runs in
    eval mode under ``torch.no_grad()``; its train/eval modes and the tokenizer's padding are restored after.
    """
    if not examples:
        raise ValueError("evaluate_generation needs at least one example")
    if any(example.task == TEXT for example in examples):
        raise ValueError("plain texts have no answer to generate: score them by their loss (evaluate_examples)")
    if max_new_tokens is None:
        max_new_tokens = max(NEW_TOKENS[example.task] for example in examples)
    rank, world_size = _ranks(across_ranks)
    lockstep = world_size > 1 and forwards_need_every_rank(model)
    plan = batch_plan(len(examples), batch_size, rank, world_size, lockstep=lockstep)
    generated: dict[int, str] = {}
    with _generation_mode(model, tokenizer), torch.no_grad():
        for indices in tqdm(plan, desc="evaluate", disable=not show_progress):
            batch = [examples[i] for i in (indices if indices is not None else range(min(batch_size, len(examples))))]
            prompts = [format_prompt(tokenizer, example) for example in batch]
            texts = _generate(model, tokenizer, prompts, max_new_tokens, synced=lockstep)
            if indices is not None:
                generated.update(zip(indices, texts, strict=True))
    if world_size > 1:
        fillers = sum(indices is None for indices in plan)
        logger.info(
            "rank %d of %d: generated %d of %d held-out answers%s",
            rank, world_size, len(generated), len(examples),
            f" (in lockstep; filler batches: {fillers})" if lockstep else "",
        )  # fmt: skip
        shares: list[dict[int, str]] = [{} for _ in range(world_size)]
        torch.distributed.all_gather_object(shares, generated)
        generated = {index: text for share in shares for index, text in share.items()}
    totals: dict[str, list[float]] = defaultdict(list)
    predictions = []
    for index, example in enumerate(examples):
        prediction = extract_answer(example.task, generated[index])
        for metric, value in score(example.task, prediction, example.answers).items():
            totals[metric].append(value)
        predictions.append({"prompt": example.prompt, "prediction": prediction, "answers": example.answers})
    means = {metric: sum(values) / len(values) for metric, values in totals.items()}
    return {**means, "n": len(examples), "predictions": predictions}


def evaluate_loss(
    model: nn.Module,
    features: Sequence[dict[str, list[int]]],
    pad_token_id: int,
    device: Any,
    *,
    batch_size: int = 8,
    across_ranks: bool = False,
) -> float:
    """The mean loss per answer token of ``features`` (:func:`meft_ds.data.tokenize_for_training`'s), teacher-forced:
    the held-out counterpart of the training loss (which weights micro-batches alike, not tokens).

    ``across_ranks=True`` shares the batches out as :func:`evaluate_generation` does (in lockstep where forwards run
    collectives) and sums the ranks' totals: every rank returns what one rank computes alone, up to float rounding.
    The model runs in eval mode under ``torch.no_grad()``; its mode is restored after."""
    if not features:
        raise ValueError("evaluate_loss needs at least one feature")
    rank, world_size = _ranks(across_ranks)
    lockstep = world_size > 1 and forwards_need_every_rank(model)
    totals = torch.zeros(2, dtype=torch.float32, device=device)  # loss summed over answer tokens, their count
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for indices in batch_plan(len(features), batch_size, rank, world_size, lockstep=lockstep):
                chosen = indices if indices is not None else range(min(batch_size, len(features)))
                batch = {
                    key: value.to(device) for key, value in collate([features[i] for i in chosen], pad_token_id).items()
                }
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
                labels = batch["labels"][:, 1:]
                loss = nn.functional.cross_entropy(
                    logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
                )
                if indices is not None:
                    totals += torch.stack([loss, (labels != IGNORE_INDEX).sum().float()])
    finally:
        model.train(training)
    if world_size > 1:
        torch.distributed.all_reduce(totals)
    return (totals[0] / totals[1]).item()


def evaluate_examples(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    max_length: int,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    show_progress: bool = False,
    across_ranks: bool = False,
) -> dict[str, Any]:
    """The held-out scores of ``examples``: :func:`evaluate_generation`'s, or for plain texts (task
    :data:`~meft_ds.schemas.TEXT`: nothing to generate) their ``loss`` per token, teacher-forced on
    ``max_length``-token windows as in training (:func:`evaluate_loss`), its ``perplexity`` and ``n``."""
    texts = sum(example.task == TEXT for example in examples)
    if not texts:
        return evaluate_generation(
            model, tokenizer, examples, max_new_tokens=max_new_tokens, batch_size=batch_size,
            show_progress=show_progress, across_ranks=across_ranks,
        )  # fmt: skip
    if texts < len(examples):
        raise ValueError("examples mix plain texts with questions: score each kind apart")
    features = tokenize_for_training(examples, tokenizer, max_length)
    device = next(model.parameters()).device
    pad = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id  # labels ignore it
    loss = evaluate_loss(model, features, pad, device, batch_size=batch_size, across_ranks=across_ranks)
    return {"loss": loss, "perplexity": math.exp(loss), "n": len(examples)}


def format_scores(result: dict[str, Any] | None) -> str:
    """One line of an evaluation's mean scores, e.g. ``exact_match 0.690, f1 0.742``."""
    if not result:
        return "skipped"
    return ", ".join(f"{key} {value:.3f}" for key, value in result.items() if isinstance(value, float))
