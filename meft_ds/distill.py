"""Rehearsal on the untrained model's next-token distributions instead of its greedy tokens.

Rehearsing the base model's own greedy answers (:mod:`meft_ds.rehearsal`) with the usual cross-entropy still moves
the model: every answer token's probability is pushed towards 1, so a model trained on nothing but those answers
drifts (on the built-in model it kept 84% of the retention probe after 10 steps and 47% after 100; BENCHMARKS.md,
quality). Learning without forgetting (Li & Hoiem, 2016) matches the old model's *distribution* instead: at each
answer position the target is the untrained model's next-token distribution, which the untrained model already
meets: rehearsal alone starts at its optimum (zero loss and gradient, up to rounding). Measured on the built-in model
(BENCHMARKS.md, quality): alone it kept 93% of the probe where the answer tokens kept 84%, but beside new facts it
kept less than they do (77% against 82%): a softer target, which the new data moves more easily.

The untrained model's distribution is kept as its ``TOP_K`` most likely tokens and the mass of all the others (the
"rest"): the loss at a rehearsed position is the KL divergence between teacher and student over those ``TOP_K + 1``
outcomes (zero when they match, and a lower bound of the full KL), computed from the student's full-vocabulary
softmax. Targets are computed once, before training (and before a resumed run loads its checkpoint, as the rehearsed
answers are), from the model as it is then: every method starts at the base model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from meft_ds.data import IGNORE_INDEX, collate

TOP_K = 32  # tokens of the untrained model's distribution kept per position (the rest is one outcome)


@torch.no_grad()
def with_teacher(
    model: nn.Module, features: Sequence[dict[str, Any]], device: torch.device | str, *, batch_size: int = 8
) -> list[dict[str, Any]]:
    """``features`` (``{"input_ids", "labels"}``) each with the model's top-``TOP_K`` next-token log-probabilities
    at its labelled positions: ``teacher_ids`` / ``teacher_logprobs`` of shape ``(len(input_ids), TOP_K)``, aligned
    with ``labels`` (row t holds the distribution the model predicts for token t; unlabelled rows are zero)."""
    was_training = model.training
    model.eval()
    out: list[dict[str, Any]] = []
    try:
        for start in range(0, len(features), batch_size):
            chunk = features[start : start + batch_size]
            batch = collate(chunk, pad_token_id=0)  # padded positions are masked out and never read back
            logits = model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).logits
            logprobs, ids = (t.cpu() for t in torch.log_softmax(logits.float(), dim=-1).topk(TOP_K, dim=-1))
            for row, feature in enumerate(chunk):
                length = len(feature["input_ids"])
                labelled = batch["labels"][row, 1:length] != IGNORE_INDEX
                teacher_ids = torch.zeros(length, TOP_K, dtype=torch.long)
                teacher_logprobs = torch.zeros(length, TOP_K, dtype=torch.float32)
                # the distribution predicted at position t - 1 is the target of token t
                teacher_ids[1:][labelled] = ids[row, : length - 1][labelled]
                teacher_logprobs[1:][labelled] = logprobs[row, : length - 1][labelled]
                out.append({**feature, "teacher_ids": teacher_ids, "teacher_logprobs": teacher_logprobs})
    finally:
        model.train(was_training)
    return out


def teacher_batch(features: Sequence[dict[str, Any]], width: int) -> dict[str, torch.Tensor] | None:
    """The teacher targets of a micro-batch's ``features``, right-padded to ``width`` as :func:`collate` pads the
    tokens, and ``teacher_rows``: which rows have them (the others are learned with cross-entropy). None when no
    feature of the batch has targets."""
    if not any("teacher_ids" in feature for feature in features):
        return None
    batch = {
        "teacher_ids": torch.zeros(len(features), width, TOP_K, dtype=torch.long),
        "teacher_logprobs": torch.zeros(len(features), width, TOP_K, dtype=torch.float32),
        "teacher_rows": torch.zeros(len(features), dtype=torch.bool),
    }
    for row, feature in enumerate(features):
        if "teacher_ids" in feature:
            length = len(feature["input_ids"])
            batch["teacher_ids"][row, :length] = feature["teacher_ids"]
            batch["teacher_logprobs"][row, :length] = feature["teacher_logprobs"]
            batch["teacher_rows"][row] = True
    return batch


def mixed_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over the batch's labelled tokens of cross-entropy (rows without teacher targets) and of the KL divergence
    from the teacher's top-k-plus-rest distribution (rows with them), in fp32. Without teacher rows it is the
    causal LM's usual loss (transformers' mean token cross-entropy)."""
    logits = logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    labelled = labels != IGNORE_INDEX
    log_z = torch.logsumexp(logits, dim=-1)
    cross_entropy = log_z - logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    teacher = batch["teacher_logprobs"][:, 1:]
    student = logits.gather(-1, batch["teacher_ids"][:, 1:]) - log_z.unsqueeze(-1)  # log p of the teacher's top k
    teacher_rest = (1 - teacher.exp().sum(-1)).clamp(min=0)
    student_rest = (-torch.expm1(torch.logsumexp(student, dim=-1))).clamp(min=1e-30)
    kl = (teacher.exp() * (teacher - student)).sum(-1) + torch.xlogy(teacher_rest, teacher_rest)
    kl = kl - teacher_rest * student_rest.log()
    per_token = torch.where(batch["teacher_rows"].unsqueeze(-1), kl, cross_entropy)
    return (per_token * labelled).sum() / labelled.sum().clamp(min=1)


def micro_batch_loss(model: Any, features: Sequence[dict[str, Any]], pad_token_id: int, device: Any) -> torch.Tensor:
    """The training loss of one micro-batch through ``model`` (a DeepSpeed engine or the model): the causal LM's own
    loss, or :func:`mixed_loss` when some of ``features`` carry teacher targets."""
    batch = {key: value.to(device) for key, value in collate(features, pad_token_id).items()}
    teacher = teacher_batch(features, batch["input_ids"].shape[1])
    if teacher is None:
        return model(**batch).loss
    batch |= {key: value.to(device) for key, value in teacher.items()}
    return mixed_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch)
