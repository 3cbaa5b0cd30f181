"""Which touched rows an optimizer step updates: all of them, or the ``update_rows`` with the highest TF-IDF score.

Sparse memory fine-tuning (Lin et al., 2025, "Continual Learning via Sparse Memory Finetuning") updates only the
memory slots that the new data uses much more than background data does, and so forgets less of what the model knew.
Here a slot is a row of an adapter's store:

* term frequency ``tf``: how many of the optimizer step's tokens (over its micro-batches) selected the row;
* document frequency ``df``: in how many background documents (text the base model already handles, e.g. its own
  answers to general questions) any token selected it, counted once before training (:meth:`RowSelection.background`);
* score ``tf * log((N + 1) / (df + 1))`` over ``N`` background documents. A row that every background document
  selects scores 0; without a background every row has the same idf, and the most-selected rows win.

Rows left out keep their values and moments (their gradients are dropped with the step's).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from meft_ds.routing import Routing


class RowSelection:
    """One adapter's TF-IDF statistics and its choice of rows to update."""

    def __init__(self, num_rows: int, update_rows: int) -> None:
        if update_rows < 1:
            raise ValueError(f"update_rows must be >= 1, got {update_rows}")
        self.update_rows = update_rows
        self.term_counts = torch.zeros(num_rows)  # this optimizer step's tokens per row
        self.idf = torch.ones(num_rows)
        self.background_documents = 0
        self._document_counts: torch.Tensor | None = None  # set while a background is being read

    def observe(self, routing: Routing, training: bool) -> None:
        """Count one forward's routing: one background document while :meth:`background` is open, else (in
        training forwards only) the tokens that selected each row."""
        if self._document_counts is not None:
            self._document_counts[routing.row_ids] += 1
            self.background_documents += 1
        elif training:
            tokens = torch.bincount(routing.union_pos.flatten(), minlength=routing.row_ids.numel())
            self.term_counts.index_add_(0, routing.row_ids, tokens.to(self.term_counts.dtype))

    @contextlib.contextmanager
    def background(self) -> Iterator[None]:
        """Every forward inside the block is one background document (a batch of one sequence); at its end the idf
        is computed from them, replacing an earlier background's. An exception leaves the earlier one in place."""
        self._document_counts, documents_before = torch.zeros_like(self.idf), self.background_documents
        self.background_documents = 0
        try:
            yield
            self.idf = torch.log((self.background_documents + 1) / (self._document_counts + 1))
        except BaseException:
            self.background_documents = documents_before
            raise
        finally:
            self._document_counts = None

    def choose(self, row_ids: torch.Tensor) -> torch.Tensor | None:
        """Positions in ``row_ids`` (the rows holding a gradient here) of the rows to update, ascending; ``None``: all
        of them. The rows updated are the ``update_rows`` of the whole store with the highest scores, never one that
        scores 0 (every background document selects it, or no token of the step did), so a shard of the store, given
        the step's counts summed over the ranks, updates its part of the same choice. Starts the next step's counts."""
        scores = self.term_counts * self.idf
        self.term_counts.zero_()
        eligible = int((scores > 0).sum())
        chosen = torch.zeros(scores.numel(), dtype=torch.bool)
        chosen[scores.topk(min(eligible, self.update_rows), sorted=False).indices] = True
        mine = chosen[row_ids]
        return None if bool(mine.all()) else mine.nonzero().flatten()

    def reset(self) -> None:
        """Forget the step's counts (its gradients were dropped)."""
        self.term_counts.zero_()
