"""evaluate_generation: greedy decoding on a tiny random model, and the extraction path with a model that answers
with the references."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_data import word_tokenizer
from tiny_models import tiny_model
from torch import nn

from meft_ds.data import Example, load_examples
from meft_ds.evaluation import evaluate_generation, extract_answer

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


def test_extract_answer() -> None:
    assert extract_answer("qa", "  Velmora\nQuestion: next") == "Velmora"
    assert extract_answer("toolbench", "a.b; c.d\n\nmore") == "a.b; c.d"
    assert extract_answer("gsm8k", "48/2 = 24\n#### 72\n") == "48/2 = 24\n#### 72"


def test_no_examples_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one example"):
        evaluate_generation(ReferenceAnswerer(None, []), None, [])


def test_example_with_context_is_scored_like_any_qa() -> None:
    tokenizer = word_tokenizer(chat=False)
    example = Example("Who won?", ["Denver Broncos"], context="Denver Broncos won.")
    result = evaluate_generation(ReferenceAnswerer(tokenizer, ["the Denver Broncos"]), tokenizer, [example])
    assert result["exact_match"] == 1.0
