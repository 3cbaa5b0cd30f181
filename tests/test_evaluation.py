"""evaluate_generation: greedy decoding on a tiny random model, the extraction path with a model that answers with
the references, and the evaluation shared out over ranks; evaluate_examples: plain texts scored by their loss."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_data import word_tokenizer
from tiny_models import tiny_model
from torch import nn

import meft_ds
from meft_ds import evaluation
from meft_ds.data import Example, load_examples, tokenize_for_training
from meft_ds.evaluation import batch_plan, evaluate_examples, evaluate_generation, extract_answer

DATA = Path(__file__).parent / "data"


class ReferenceAnswerer(nn.Module):
    """Stands in for a model whose greedy answer is the reference: ``generate`` appends each example's first answer
    and EOS after its prompt, right-padded as ``generate`` pads finished rows."""

    def __init__(self, tokenizer, answers: list[str]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.tokenizer = tokenizer
        self.answers = list(answers)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: object) -> torch.Tensor:
        assert not self.training and not torch.is_grad_enabled()
        assert kwargs["do_sample"] is False and attention_mask[:, -1].all()  # left padding: prompts end together
        eos = self.tokenizer.eos_token_id
        replies = [
            [*self.tokenizer(f" {self.answers.pop(0)}", add_special_tokens=False)["input_ids"], eos] for _ in input_ids
        ]
        width = max(map(len, replies))
        new = torch.tensor([reply + [kwargs["pad_token_id"]] * (width - len(reply)) for reply in replies])
        return torch.cat([input_ids, new], dim=1)


@pytest.mark.parametrize("chat", [False, True])
def test_reference_answers_score_full_marks(chat: bool) -> None:
    tokenizer = word_tokenizer(chat=chat)
    examples = load_examples("facts", split="eval", limit=5)
    model = ReferenceAnswerer(tokenizer, [e.answers[0] for e in examples]).train()
    result = evaluate_generation(model, tokenizer, examples, batch_size=2)
    assert result["exact_match"] == result["f1"] == 1.0 and result["n"] == 5
    assert result["predictions"][0] == {
        "prompt": examples[0].prompt,
        "prediction": examples[0].answers[0],
        "answers": examples[0].answers,
    }
    assert model.training and tokenizer.padding_side == "right" and tokenizer.pad_token is None  # all restored


def test_every_task_reports_its_metric() -> None:
    tokenizer = word_tokenizer(chat=False)
    examples = load_examples(DATA / "toolbench.json") + load_examples(DATA / "gsm8k.jsonl")
    model = ReferenceAnswerer(tokenizer, [e.answers[0] for e in examples])
    result = evaluate_generation(model, tokenizer, examples, batch_size=3)
    assert {key: result[key] for key in ("iou", "accuracy", "n")} == {"iou": 1.0, "accuracy": 1.0, "n": 4}
    assert "\n#### 72" in result["predictions"][2]["prediction"]  # a GSM8K solution keeps all its lines


@pytest.mark.parametrize("chat", [False, True])
def test_greedy_decoding_on_a_tiny_random_model(chat: bool) -> None:
    tokenizer = word_tokenizer(chat=chat)
    model = tiny_model("llama").train()
    model.model.layers[0].eval()  # a submodule in eval mode stays so
    examples = load_examples("facts", split="eval", limit=3)
    result = evaluate_generation(model, tokenizer, examples, max_new_tokens=4, batch_size=2)
    assert result["n"] == 3 and len(result["predictions"]) == 3
    assert 0.0 <= result["exact_match"] <= 1.0 and 0.0 <= result["f1"] <= 1.0
    assert all(isinstance(p["prediction"], str) for p in result["predictions"])
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training
    again = evaluate_generation(model, tokenizer, examples, max_new_tokens=4, batch_size=3)
    assert again["predictions"] == result["predictions"]  # greedy, and batching/padding does not change answers


def test_the_head_of_a_frozen_model_multiplies_one_matrix_in_generation() -> None:
    """Generation's first forward hands the head the last position of each prompt, a strided slice; with the head's
    weight frozen (as under adapters) torch multiplies such an input prompt by prompt against an expanded weight,
    in bf16 on a CPU after copying it (1.8 GB for SmolLM2 at 32 prompts). The head gets a contiguous input, and
    nothing is left hooked afterwards."""
    tokenizer = word_tokenizer(chat=True)
    model = tiny_model("llama").requires_grad_(False)
    examples = load_examples("facts", split="eval", limit=3)
    head = model.get_output_embeddings()
    seen: list[bool] = []
    forward = head.forward

    def recording_forward(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.is_contiguous())
        return forward(x)

    head.forward = recording_forward
    evaluate_generation(model, tokenizer, examples, max_new_tokens=3, batch_size=3)
    assert len(seen) == 3 and all(seen)  # the prompts, then two new tokens
    assert not head._forward_pre_hooks


def test_extract_answer() -> None:
    assert extract_answer("qa", "  Velmora\nQuestion: next") == "Velmora"
    assert extract_answer("toolbench", "a.b; c.d\n\nmore") == "a.b; c.d"
    assert extract_answer("gsm8k", "48/2 = 24\n#### 72\n") == "48/2 = 24\n#### 72"


def test_no_examples_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one example"):
        evaluate_generation(ReferenceAnswerer(None, []), None, [])


def test_plain_texts_are_scored_by_their_loss_per_token() -> None:
    tokenizer = word_tokenizer(chat=False)  # no pad token: EOS pads, unlearned
    model = tiny_model("llama").train()
    texts = load_examples(DATA / "text.jsonl")
    result = evaluate_examples(model, tokenizer, texts, max_length=8, batch_size=3)
    assert model.training and result["n"] == 2 and result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    losses = []
    with torch.no_grad():
        for feature in tokenize_for_training(texts, tokenizer, max_length=8):  # the windows of training, one by one
            ids = torch.tensor([feature["input_ids"]])
            logits = model.eval()(input_ids=ids).logits[0, :-1]
            losses.append(nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none"))
    assert result["loss"] == pytest.approx(torch.cat(losses).mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="plain texts have no answer to generate"):
        evaluate_generation(model, tokenizer, texts)
    questions = load_examples("facts", split="eval", limit=2)
    with pytest.raises(ValueError, match="mix plain texts with questions"):
        evaluate_examples(model, tokenizer, [*texts, *questions], max_length=8)
    answered = ReferenceAnswerer(tokenizer, [e.answers[0] for e in questions])
    assert evaluate_examples(answered, tokenizer, questions, max_length=8)["exact_match"] == 1.0  # questions: generated


def test_example_with_context_is_scored_like_any_qa() -> None:
    tokenizer = word_tokenizer(chat=False)
    example = Example("Who won?", ["Denver Broncos"], context="Denver Broncos won.")
    result = evaluate_generation(ReferenceAnswerer(tokenizer, ["the Denver Broncos"]), tokenizer, [example])
    assert result["exact_match"] == 1.0


@pytest.mark.parametrize(("examples", "world_size"), [(7, 2), (7, 3), (2, 3), (8, 2)])
def test_batch_plan_gives_every_one_rank_batch_to_one_rank(examples: int, world_size: int) -> None:
    one_rank = batch_plan(examples, 2, 0, 1, lockstep=False)
    for lockstep in (False, True):
        plans = [batch_plan(examples, 2, rank, world_size, lockstep=lockstep) for rank in range(world_size)]
        real = [batch for plan in plans for batch in plan if batch is not None]
        assert sorted(real, key=lambda r: r.start) == one_rank  # the same batches, each once
        lengths = {len(plan) for plan in plans}
        assert len(lengths) == 1 if lockstep else max(lengths) - min(lengths) <= 1
    assert batch_plan(7, 2, 1, 2, lockstep=True) == [range(2, 4), range(6, 7)]
    assert batch_plan(5, 2, 1, 2, lockstep=True) == [range(2, 4), None]  # a filler batch keeps rank 1 in step


class Recorder(nn.Module):
    """A tiny model whose ``generate`` calls are recorded (``synced_gpus`` needs a process group: dropped here)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.generation_config = model.generation_config
        self.calls: list[dict] = []

    def generate(self, input_ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
        self.calls.append({"rows": input_ids.shape[0], "synced_gpus": kwargs.pop("synced_gpus", False)})
        return self.model.generate(input_ids=input_ids, **kwargs)


@pytest.mark.parametrize("lockstep", [False, True])
def test_answers_shared_out_over_ranks_are_the_one_rank_answers(
    monkeypatch: pytest.MonkeyPatch, lockstep: bool
) -> None:
    """Two ranks simulated in one process: each generates its share, the gather joins them; the result is the
    one-rank result. In lockstep (ZeRO-3, sharded stores) both run equally many synced generate calls."""
    tokenizer = word_tokenizer(chat=True)
    examples = load_examples("facts", split="eval", limit=5)
    alone = evaluate_generation(tiny_model("llama"), tokenizer, examples, max_new_tokens=4, batch_size=2)
    monkeypatch.setattr(evaluation.torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(evaluation, "forwards_need_every_rank", lambda model: lockstep)
    shares, calls = {}, {}

    class Gathered(Exception):
        """Rank 1 stops at the gather: its share is what rank 0 needs."""

    def all_gather_object(out: list, mine: dict) -> None:
        shares[evaluation.torch.distributed.get_rank()] = mine
        if len(shares) < 2:
            raise Gathered
        out[:] = [shares[0], shares[1]]

    monkeypatch.setattr(evaluation.torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(evaluation.torch.distributed, "all_gather_object", all_gather_object)
    for rank in (1, 0):
        monkeypatch.setattr(evaluation.torch.distributed, "get_rank", lambda rank=rank: rank)
        model = calls[rank] = Recorder(tiny_model("llama"))
        try:
            result = evaluate_generation(model, tokenizer, examples, max_new_tokens=4, batch_size=2, across_ranks=True)
        except Gathered:
            assert rank == 1
    calls = {rank: model.calls for rank, model in calls.items()}
    assert result == alone
    assert [c["rows"] for c in calls[0]] == [2, 1] and [c["rows"] for c in calls[1]] == [2] + [2] * lockstep
    assert {c["synced_gpus"] for c in calls[0] + calls[1]} == {lockstep}


def test_adapters_fresh_from_inject_answer_like_the_base_model() -> None:
    """train.py's "before" evaluation runs with the adapters in place: their values start at zero."""
    tokenizer = word_tokenizer(chat=True)
    examples = load_examples("facts", split="eval", limit=4)
    base = evaluate_generation(tiny_model("llama"), tokenizer, examples, max_new_tokens=6, batch_size=2)
    adapted = meft_ds.inject(tiny_model("llama"), {"num_neurons": 64, "top_k": 4})
    assert evaluate_generation(adapted, tokenizer, examples, max_new_tokens=6, batch_size=2) == base
    assert meft_ds.stats(adapted)["rows_fetched"] > 0  # the adapters did run
