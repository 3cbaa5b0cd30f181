"""Issue 14's pieces below the launcher: the retention probe (its stored list, its rule, the built-in model knowing
every kept question), the rows' clipping modes against a hand-written reference, and the quality benchmark's
bookkeeping (commands, resume, best learning rate, targets) with a stand-in for the training processes."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from engine_support import LR, MEFT, batches, ds_config, train_with_engine
from test_evaluation import ReferenceAnswerer
from tiny_models import tiny_model, token_batch, word_tokenizer

import meft_ds
from meft_ds import SparseRowAdam, distill, probe, rehearsal
from meft_ds.config import MeftConfigError
from meft_ds.data import collate
from meft_ds.metrics import normalize_answer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))

from bench import quality, quality_grid
from bench.common import Section

# ----------------------------------------------------------------------------------------------------------------
# the retention probe


def test_probe_answers_count_as_whole_words_after_normalisation() -> None:
    assert probe.is_right("The capital of France is Paris.", ["Paris"])
    assert probe.is_right("new delhi", ["New Delhi", "Delhi"])
    assert not probe.is_right("Parisian", ["Paris"])  # a whole word, not a prefix
    assert not probe.is_right("Tellarby", ["Paris"])


def test_the_stored_probe_is_the_candidates_the_base_model_got_right() -> None:
    stored = json.loads(probe.PROBE_FILE.read_text())
    candidates = {question: list(answers) for question, answers in probe.CANDIDATES}
    assert stored["candidates"] == len(probe.CANDIDATES) and stored["max_new_tokens"] == probe.NEW_TOKENS
    assert 30 <= len(stored["questions"]) <= len(candidates)
    for kept in stored["questions"]:
        assert candidates[kept["question"]] == kept["answers"]
        assert probe.is_right(kept["base_answer"], kept["answers"])  # what the model answered at build time
    assert [e.prompt for e in probe.probe_examples()] == [q["question"] for q in stored["questions"]]


def test_retained_counts_what_was_known_before() -> None:
    before = [{"right": r} for r in (True, True, False, True)]
    after = [{"right": r} for r in (True, False, True, True)]
    assert probe.retained(before, after) == {"known": 3, "still_right": 2, "fraction": 2 / 3}
    assert probe.retained(None, after) == {"known": 4, "still_right": 3, "fraction": 3 / 4}  # all known before


def test_probe_check_counts_the_kept_questions_a_model_still_answers(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    kept = probe.probe_examples()
    tokenizer = word_tokenizer(chat=True)
    replies = ["Tellarby", *(e.answers[0] for e in kept[1:])]  # the first kept question answered wrong
    loaded = []
    monkeypatch.setattr(
        meft_ds.models, "load_model_and_tokenizer",
        lambda name, dtype: loaded.append((name, dtype)) or (ReferenceAnswerer(tokenizer, replies), tokenizer),
    )  # fmt: skip
    probe.main(["--check", "bfloat16"])
    lines = capsys.readouterr().out.splitlines()
    assert loaded == [(None, torch.bfloat16)]  # the built-in model, in the dtype asked for
    right = len(kept) - 1
    assert lines[0] == f"bfloat16: {right} of {len(kept)} kept questions answered right ({right / len(kept):.0%})"
    assert lines[1:] == [f"  {kept[0].prompt} -> 'Tellarby'"]
    with pytest.raises(SystemExit):
        probe.main([])  # neither --build nor --check


def test_building_the_probe_keeps_the_candidates_answered_right(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--build`` asks every candidate of the built-in model in fp32 and keeps those it answers right, each with its
    answer, in the probe file."""
    tokenizer = word_tokenizer(chat=True)
    replies = [answers[0] if i % 3 else "Tellarby" for i, (_, answers) in enumerate(probe.CANDIDATES)]
    loaded = []
    monkeypatch.setattr(
        meft_ds.models, "load_model_and_tokenizer",
        lambda name, dtype: loaded.append((name, dtype)) or (ReferenceAnswerer(tokenizer, replies), tokenizer),
    )  # fmt: skip
    monkeypatch.setattr(probe, "PROBE_FILE", tmp_path / "probe_questions.json")
    probe.main(["--build"])
    assert loaded == [(None, torch.float32)]
    stored = json.loads((tmp_path / "probe_questions.json").read_text())
    right = [(q, list(a)) for i, (q, a) in enumerate(probe.CANDIDATES) if i % 3]
    assert [(q["question"], q["answers"]) for q in stored["questions"]] == right
    base_answers = [normalize_answer(q["base_answer"]) for q in stored["questions"]]
    assert base_answers == [normalize_answer(answers[0]) for _, answers in right]  # what the model said, kept
    assert stored["candidates"] == len(probe.CANDIDATES) and stored["model"] == meft_ds.models.BUILTIN_MODEL
    assert capsys.readouterr().out.strip().endswith(f"kept {len(right)} of {len(probe.CANDIDATES)} questions in "
                                                    f"{tmp_path / 'probe_questions.json'}")  # fmt: skip
    assert probe.probe_examples(tmp_path / "probe_questions.json")[0].prompt == right[0][0]


@pytest.mark.slow
def test_the_builtin_model_answers_every_kept_question() -> None:
    from meft_ds.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(None)  # fp32, greedy: the build's settings
    answers = probe.answer_probe(model, tokenizer, probe.probe_examples(), batch_size=16)
    wrong = [(a["prompt"], a["prediction"]) for a in answers if not a["right"]]
    assert not wrong, f"the built-in model no longer answers: {wrong}"


# ----------------------------------------------------------------------------------------------------------------
# self-rehearsal


def test_rehearsal_questions_are_not_the_probe_questions() -> None:
    asked = {normalize_answer(question) for question, _ in probe.CANDIDATES}
    rehearsed = [normalize_answer(question) for question, _ in rehearsal.QUESTIONS]
    assert len(set(rehearsed)) == len(rehearsed) >= 60
    assert not asked & set(rehearsed), "a probe question in the rehearsal set would score the training data"
    # nor the year that answers one: rehearsing it would teach a probe answer
    probe_years = {answer for _, answers in probe.CANDIDATES for answer in answers if answer.isdigit()}
    assert probe_years and not probe_years & {a for _, answers in rehearsal.QUESTIONS for a in answers}
    assert all(answers for _, answers in rehearsal.QUESTIONS)


def test_rehearsal_targets_are_the_models_own_first_lines_and_right_ones_are_kept() -> None:
    tokenizer = word_tokenizer(chat=True)
    # Peru, Mexico, Brazil, Chile: the empty answer is left out, a wrong one is dropped by answered_right
    replies = ["Lima is the capital.\nAnd more.", "", "Mexico City", "The capital of Chile is Santiago."]
    model = ReferenceAnswerer(tokenizer, replies)
    examples = rehearsal.rehearsal_examples(model, tokenizer, 4, batch_size=2)
    (peru, _), _, (brazil, _), (chile, _) = rehearsal.QUESTIONS[:4]
    assert [(e.prompt, e.answers[0]) for e in examples] == [
        (peru, "Lima is the capital."),
        (brazil, "Mexico City"),
        (chile, "The capital of Chile is Santiago."),
    ]
    assert [e.prompt for e in rehearsal.answered_right(examples)] == [peru, chile]
    with pytest.raises(ValueError, match=r"rehearsal count must be 1\.\.112"):
        rehearsal.rehearsal_examples(model, tokenizer, 113)


def rehearsal_features(lengths: list[int], prompt: int = 4) -> list[dict[str, list[int]]]:
    """Random token sequences of ``lengths``, their first ``prompt`` tokens unlabelled (as tokenize_for_training)."""
    ids = [token_batch(1, n, seed=n)[0].tolist() for n in lengths]
    return [{"input_ids": x, "labels": [-100] * prompt + x[prompt:]} for x in ids]


def reference_loss(
    student: torch.Tensor, teacher: torch.Tensor, features: list[dict[str, list[int]]], teacher_rows: list[bool]
) -> float:
    """In float64, token by token: cross-entropy on the labelled tokens of rows without a teacher; on the others the
    KL divergence of the teacher's distribution, its 32 most likely tokens and the rest, from the student's; the
    mean over every labelled token. ``student`` / ``teacher``: full logits, (rows, width, vocab)."""
    total, count = 0.0, 0
    for row, feature in enumerate(features):
        for t, label in enumerate(feature["labels"]):
            if label == -100:
                continue
            p = torch.softmax(student[row, t - 1].double(), -1)
            if teacher_rows[row]:
                q = torch.softmax(teacher[row, t - 1].double(), -1)
                top = q.topk(32).indices
                q_coarse = torch.cat([q[top], (1 - q[top].sum()).unsqueeze(0)])
                p_coarse = torch.cat([p[top], (1 - p[top].sum()).unsqueeze(0)])
                total += float((q_coarse * (q_coarse / p_coarse).log()).sum())
            else:
                total -= math.log(float(p[label]))
            count += 1
    return total / count


def test_distribution_rehearsal_starts_at_zero_and_is_the_kl_from_the_untrained_model() -> None:
    model = tiny_model()
    features = rehearsal_features([12, 9, 15])
    batch = collate(features, pad_token_id=0)
    # no teacher rows: the causal LM's own loss
    assert distill.teacher_batch(features, 15) is None
    assert distill.micro_batch_loss(model, features, 0, "cpu") == model(**batch).loss
    no_teacher = distill.teacher_batch(distill.with_teacher(model, features[:1], "cpu"), 15)
    no_teacher["teacher_rows"][:] = False
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(distill.mixed_loss(logits, batch | no_teacher), model(**batch).loss)
    # targets from the model itself, in batches of 2: loss and gradients zero up to rounding
    taught = distill.with_teacher(model, features, "cpu", batch_size=2)
    assert all(t["teacher_logprobs"][:4].eq(0).all() and t["teacher_logprobs"][4:].lt(0).all() for t in taught)
    loss = distill.micro_batch_loss(model.train(), taught, 0, "cpu")
    loss.backward()
    assert abs(loss.item()) < 1e-6
    assert max(p.grad.abs().max() for p in model.parameters()) < 1e-5
    # a moved model, a batch of one taught row and two plain ones: the token-wise reference
    teacher = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.detach()
    with torch.no_grad():
        model.lm_head.weight.add_(0.05 * torch.randn_like(model.lm_head.weight))
    student = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.detach()
    mixed = [taught[0], features[1], features[2]]
    expected = reference_loss(student, teacher, features, [True, False, False])
    assert float(distill.micro_batch_loss(model, mixed, 0, "cpu")) == pytest.approx(expected, rel=1e-4)
    assert expected > 1e-2  # the moved model is measurably away from its teacher


def test_distribution_rehearsal_in_bf16_starts_near_zero_with_fp32_targets() -> None:
    model = tiny_model().to(torch.bfloat16)
    taught = distill.with_teacher(model, rehearsal_features([12, 9, 15]), "cpu", batch_size=2)
    assert all(t["teacher_logprobs"].dtype == torch.float32 for t in taught)
    loss = distill.micro_batch_loss(model.train(), taught, 0, "cpu")  # other batch shapes: bf16 rounds otherwise
    loss.backward()
    assert loss.dtype == torch.float32 and abs(loss.item()) < 1e-3
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------------
# clipping the rows: global, separate, none


def clipped_reference(steps: int, clip: float, mode: str) -> tuple[torch.nn.Module, list[float]]:
    """Routers by torch AdamW, rows by SparseRowAdam, DeepSpeed's WarmupLR; ``mode`` "separate": the routers'
    gradients clipped by their norm and the rows' by theirs; "none": only the routers' clipped. Returns the model and
    each step's norm before clipping, over the routers' gradients and the rows'."""
    model = meft_ds.inject(tiny_model(), MEFT)
    routers = [p for p in model.parameters() if p.requires_grad]
    dense = torch.optim.AdamW(routers, lr=LR, eps=1e-8, weight_decay=0.0)
    sparse = SparseRowAdam(meft_ds.adapters(model), lr=LR, backend="torch")
    norms = []
    for t, batch in enumerate(batches(steps)):
        model(batch, labels=batch).loss.backward()
        routers_norm = float(torch.nn.utils.clip_grad_norm_(routers, clip))
        for adapter in meft_ds.adapters(model):
            adapter.collect_row_grads()
        row_grads = [a.store.accumulated_grads()[1] for a in meft_ds.adapters(model)]
        rows_norm = math.sqrt(sum(g.double().pow(2).sum().item() for g in row_grads))
        norms.append(math.hypot(routers_norm, rows_norm))
        coefficient = clip / (rows_norm + 1e-6)
        if mode == "separate" and coefficient < 1:
            for g in row_grads:
                g.mul_(coefficient)
        for group in dense.param_groups + sparse.param_groups:
            group["lr"] = LR * min(1.0, max(0, t - 1) / 4)
        dense.step()
        sparse.step()
        dense.zero_grad()
        sparse.zero_grad()
    return model, norms


@pytest.mark.parametrize("mode", ["separate", "none"])
def test_rows_clipped_apart_or_not_at_all_match_a_reference(mode: str) -> None:
    clip = 0.05  # far below both norms: clipping is active at every step
    config = ds_config(2, clip=clip)
    config["meft"] = {**MEFT, "clip_rows": mode}
    run = train_with_engine(config, steps=4)
    reference, reference_norms = clipped_reference(steps=4, clip=clip, mode=mode)
    for ours, theirs in zip(meft_ds.adapters(run.model), meft_ds.adapters(reference), strict=True):
        torch.testing.assert_close(ours.store.rows, theirs.store.rows, rtol=0, atol=2e-5)
        torch.testing.assert_close(ours.router.weight, theirs.router.weight, rtol=0, atol=2e-5)
    # engine.get_global_grad_norm(): the norm before clipping over both, the rows' measured in both modes
    assert run.grad_norms == pytest.approx(reference_norms, rel=1e-4)


def test_clip_rows_is_validated() -> None:
    with pytest.raises(MeftConfigError, match=r"meft\.clip_rows: unknown mode 'rows'.*'global', 'separate', 'none'"):
        meft_ds.MeftConfig(clip_rows="rows")


# ----------------------------------------------------------------------------------------------------------------
# the quality benchmark's bookkeeping


def fake_results(em: float, device_bytes: int, retained: float | None = 1.0) -> dict[str, Any]:
    return {
        "after": {"exact_match": em, "f1": em}, "retention": {"fraction": retained}, "trainable_params": 10,
        "device_training": {"device_bytes": device_bytes}, "last_loss": 0.1, "seconds": 1.0,
    }  # fmt: skip


GRID = quality_grid.Grid(
    facts=25, steps=2, micro_batch=4, eval_limit=8, model="/tiny", name="test",
    cells=(
        quality_grid.meft("MEFT", 256, (1e-3, 3e-3)),
        quality_grid.Cell("LoRA", "lora", ("--lora_r", "4"), (3e-3,), seeds=(0, 1)),
        quality_grid.Cell("PA", "parallel_adapter", ("--adapter_neurons", "8"), (3e-3,), steps=1),  # its own steps
    ),
)  # fmt: skip
SCORES = {  # (method, lr): (EM, device bytes)
    ("meft", 1e-3): (0.5, 300), ("meft", 3e-3): (0.7, 300), ("lora", 3e-3): (0.6, 400),
    ("parallel_adapter", 3e-3): (0.8, 200),
}  # fmt: skip


def test_grid_runs_every_cell_lr_and_seed_once_and_resumes(tmp_path: Path) -> None:
    commands: list[list[str]] = []

    def runner(command: list[str], output_dir: Path) -> dict[str, Any]:
        commands.append(command)
        method, lr = command[command.index("--method") + 1], float(command[command.index("--learning_rate") + 1])
        return fake_results(*SCORES[method, lr])

    notes: list[str] = []
    records = quality.run_grid(GRID, tmp_path, runner, notes)
    assert len(commands) == len(records) == 5 and notes == []  # MEFT x 2 lrs, LoRA x 2 seeds, PA
    for command in commands:
        steps = "1" if command[command.index("--method") + 1] == "parallel_adapter" else "2"
        expected = {"--facts": "25", "--max_steps": steps, "--model": "/tiny", "--micro_batch_size": "4"}
        for flag, value in expected.items():
            assert command[command.index(flag) + 1] == value
        assert "--no_save" in command and "--no_eval_before" in command
    config = json.loads((tmp_path / "ds_quality.json").read_text())
    assert config["zero_optimization"]["reduce_bucket_size"] == quality.BUCKET
    assert config["bf16"] == {"enabled": False}  # fp32 on every CPU ("auto" is bf16 with AMX): machines compare
    # a second run finds every record and trains nothing
    assert quality.run_grid(GRID, tmp_path, runner, []) == records and len(commands) == 5

    best = {b["label"]: b for b in quality.best_per_cell(records)}
    assert (
        best["MEFT"]["lr"] == 3e-3
        and best["MEFT"]["em"] == 0.7
        and best["MEFT"]["sweep"] == {"0.001": 0.5, "0.003": 0.7}
    )
    assert best["LoRA"]["seeds"] == 2
    met, verdict = quality.judge(list(best.values()))
    # MEFT 0.7 < LoRA (400 bytes >= MEFT's 300) 0.6 + 0.05? no: 0.7 >= 0.65; but < the parallel adapter's 0.8
    assert met is False
    assert ">= LoRA" in verdict and "< parallel adapter" in verdict and "retains 100%" in verdict
    met, verdict = quality.judge([b for b in best.values() if b["method"] != "parallel_adapter"])
    assert met is None and "no parallel adapter within MEFT's bytes in this grid" in verdict  # passes, not judged
    # "equal" device bytes within 5% of MEFT's (its own vary with routing): a LoRA 4% below still rivals it, 6% not
    for lora_bytes, rival in ((288, True), (282, False)):
        near = [b | {"device_bytes": lora_bytes} if b["method"] == "lora" else b for b in best.values()]
        assert ("no LoRA with as many device bytes" not in quality.judge(near)[1]) == rival
    # of MEFT configurations with the same EM (e.g. with and without activation checkpointing), the one with the
    # fewest device bytes is judged
    checkpointed = best["MEFT"] | {"label": "MEFT, checkpointed", "device_bytes": 100}
    assert "best MEFT (MEFT, checkpointed, " in quality.judge([*best.values(), checkpointed])[1]

    section = quality.section([(GRID, records)], notes)
    assert isinstance(section, Section) and section.met is False and len(section.rows) == 3
    assert section.rows[0][:2] == ["25 facts, 2 steps", "MEFT"]
    # two tasks in one table, each judged on its own: the section fails where one task does
    other = dataclasses.replace(GRID, facts=50, name="other")
    passing = [r for r in records if r["method"] != "parallel_adapter"]  # MEFT >= LoRA + 0.05; no PA: not judged
    both = quality.section([(GRID, records), (other, passing)], notes)
    assert len(both.rows) == 5 and both.met is False and both.rows[3][:2] == ["50 facts, 2 steps", "MEFT"]
    assert both.verdict.startswith("25 facts, 2 steps: best MEFT") and "; 50 facts, 2 steps: best MEFT" in both.verdict
    assert quality.section([(other, passing)], notes).met is None
    section.command = "python launch/bench.py --only quality"
    quality.plot(section, str(tmp_path / "quality.png"))
    assert (tmp_path / "quality.png").stat().st_size > 0


def test_the_headline_grid_is_runs_of_the_capacity_grid(tmp_path: Path) -> None:
    """``--quality-grid headline`` (about an hour) runs four of the capacity grid's runs, at their best rates: after
    the capacity grid has run in the same folder, it finds their records and trains nothing."""
    capacity, headline = quality_grid.capacity_grid(), quality_grid.headline_grid()
    expected = [(label, (lr,), (0,)) for label, lr in quality_grid.HEADLINE.items()]
    assert [(c.label, c.lrs, c.seeds) for c in headline.cells] == expected
    runs = {(c.label, c.args, lr, seed) for c in capacity.cells for lr in c.lrs for seed in c.seeds}
    assert {(c.label, c.args, c.lrs[0], 0) for c in headline.cells} <= runs
    trained: list[str] = []

    def runner(command: list[str], output_dir: Path) -> dict[str, Any]:
        trained.append(output_dir.name)
        return fake_results(0.5, 100)

    capacity = dataclasses.replace(capacity, cells=tuple(c for c in capacity.cells if c.label in quality_grid.HEADLINE))
    quality.run_grid(capacity, tmp_path, runner)
    before = len(trained)
    assert len(quality.run_grid(headline, tmp_path, runner)) == 4 and len(trained) == before


@pytest.mark.slow
def test_quick_grid_runs_through_the_launcher(tmp_path: Path) -> None:
    """``launch/bench.py --quick --only quality``'s grid end to end on the tiny LLaMA, its first (MEFT) run only (the
    launcher tests train the other methods), with activation checkpointing, and MEFT's device-resident training bytes
    counted by hand."""
    folder = tmp_path / "tiny"
    tiny_model().save_pretrained(folder)
    word_tokenizer(chat=True).save_pretrained(folder)
    full = quality_grid.quick_grid(str(folder))
    cell = full.cells[0]
    grid = dataclasses.replace(
        full, cells=(dataclasses.replace(cell, args=(*cell.args, "--activation_checkpointing")),)
    )
    [record] = quality.run_grid(grid, tmp_path / "work")
    assert record["method"] == "meft" and record["trainable"] == 2 * 256 * 2 * 64 + 2 * 64 * 64  # rows + routers
    # fp32, d=64, 2 layers: the routers' weights, one router's gradient and DeepSpeed's offload buffer of its size (the
    # others leave through the bucket), the bucket, and the rows fetched and kept for backward:
    # checkpointed, one layer's |U| rows of 2 x 64 (the mean per adapter and forward over the run, rounded up; each
    # micro-step runs every layer's forward twice)
    [output] = (tmp_path / "work").glob("MEFT*/")
    steps = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    union = math.ceil(sum(r["rows_fetched"] for r in steps) / (2 * 2 * grid.steps))
    results = json.loads((output / "results.json").read_text())
    device = results["device_training"]
    assert results["activation_checkpointing"] and device["items"][0]["name"] == "fetched rows kept for backward"
    assert device["items"][0]["note"] == f"|U| = {union} rows per layer"
    expected = 2 * 64 * 64 * 4 + 2 * 64 * 64 * 4 + quality.BUCKET * 4 + union * 2 * 64 * 4
    assert record["device_bytes"] == device["device_bytes"] == expected == sum(i["nbytes"] for i in device["items"])
    assert 0.0 <= record["em"] <= 1.0 and 0.0 <= record["retained"] <= 1.0
    assert quality.section([(grid, [record])], []).rows[0][1] == "MEFT r=256"
