"""The background of TF-IDF row selection (``meft.update_rows``, :mod:`meft_ds.row_selection`): which rows text that
the base model already handles selects, read once before training."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import nn

from meft_ds.inject import adapters


@torch.no_grad()
def fit_background(model: nn.Module, documents: Iterable[dict[str, torch.Tensor]]) -> int:
    """Run ``model`` on each of ``documents`` (model inputs of one sequence each, e.g. ``{"input_ids": (1, n)}``) and
    make every adapter's row selection score rows by how rarely they select them (their idf); returns the number of
    documents. Call it before training, on the base model (a resumed run calls it again before loading its
    checkpoint); it replaces an earlier background."""
    selections = [a.row_selection for a in adapters(model) if a.row_selection is not None]
    if not selections:
        raise ValueError(
            "fit_background: the model's adapters do not select rows (meft.update_rows is 0). Fix: set "
            "update_rows in the meft config, or do not call fit_background."
        )
    count = 0
    with contextlib.ExitStack() as stack:
        for selection in selections:
            stack.enter_context(selection.background())
        for batch in documents:
            if batch["input_ids"].shape[0] != 1:
                raise ValueError(
                    f"fit_background: a document is one sequence, got a batch of {batch['input_ids'].shape[0]}. "
                    "Fix: pass each sequence as its own batch of one."
                )
            model(**batch)
            count += 1
    return count
