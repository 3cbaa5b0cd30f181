"""meft_ds.for_inference: rows on the device, routed there. Greedy generation is the training path's, token for token;
no byte crosses host<->device per generated token; the rows take the bytes of their dtype; training is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from async_accelerator import async_accelerator
from launch_scripts import launch_script
from tiny_models import tiny_model, token_batch, word_tokenizer

import meft_ds
import meft_ds.adapter
import meft_ds.ds_config
import meft_ds.inference
from meft_ds import InferenceOnlyError, SparseRowAdam
from meft_ds.baselines import export_baseline, exported_method, prepare_baseline
from meft_ds.data import Example, load_examples
from meft_ds.evaluation import evaluate_generation
from meft_ds.inference import DeviceRows
from meft_ds.routing import union_of
from meft_ds.training import UsageError

MEFT = {"num_neurons": 256, "num_experts": 16, "top_k": 8, "n_probe": 4, "seed": 3}  # K of 64 probed neurons
LAYERS = 3
NEW_TOKENS = 10
TRAFFIC = ("bytes_to_device", "bytes_to_host", "row_bytes_to_device", "row_bytes_to_host", "rows_fetched")


def adapted_model(dtype: torch.dtype = torch.float32, **meft: object) -> torch.nn.Module:
    """A tiny LLaMA with adapters whose values look trained (large enough to change what the model generates)."""
    model = meft_ds.inject(tiny_model(layers=LAYERS).to(dtype), {**MEFT, **meft})
    generator = torch.Generator().manual_seed(5)
    for adapter in meft_ds.adapters(model):
        adapter.store.values.normal_(0.0, 1.0, generator=generator)
    return model


def generate(model: torch.nn.Module, batch: torch.Tensor | None = None) -> torch.Tensor:
    batch = token_batch(batch=2, length=8) if batch is None else batch
    return model.generate(batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(token_batch(batch=2, length=8)).logits


def traffic(model: torch.nn.Module) -> dict[str, int]:
    stats = meft_ds.stats(model)
    return {key: stats[key] for key in TRAFFIC}


@pytest.mark.parametrize(
    ("dtype", "row_dtype"),
    [(torch.float32, "auto"), (torch.bfloat16, "auto"), (torch.float32, "bf16")],
    ids=["fp32", "bf16", "fp32 with bf16 rows"],
)
@pytest.mark.parametrize("gate", ["logit", "none"])
def test_greedy_generation_is_bit_identical_to_the_training_path(gate: str, dtype: torch.dtype, row_dtype: str) -> None:
    # rows (and the hidden states routing scores) travel rounded to the row dtype; routing scores fp32 master keys
    model = adapted_model(dtype, gate=gate, row_dtype=row_dtype)
    expected, expected_logits = generate(model), logits(model)
    assert meft_ds.stats(model)["rows_fetched"] > 0, "the reference ran the training path"
    base = tiny_model(layers=LAYERS).to(dtype)
    assert not torch.equal(generate(base), expected), "the adapter must change what is generated"

    meft_ds.for_inference(model)
    assert all(a.serving is not None and a.serving.keys.dtype == torch.float32 for a in meft_ds.adapters(model))
    assert torch.equal(generate(model), expected)
    assert torch.equal(logits(model), expected_logits)


@pytest.mark.parametrize(
    ("dtype", "masked"),
    [(torch.float32, False), (torch.float32, True), (torch.bfloat16, True)],
    ids=["fp32 vs kernel", "fp32 vs masked", "bf16 vs masked"],
)
@pytest.mark.parametrize("gate", ["logit", "none"])
def test_the_accelerator_routine_routes_like_the_training_path(
    gate: str, dtype: torch.dtype, masked: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the shape-static routine accelerators run, here on the CPU: its sums run in another order than the CPU
    # kernel's (equal up to fp32 rounding), and it computes the output like the masked path accelerators run
    if masked:
        monkeypatch.setattr(meft_ds.adapter, "computes_over_top_k", lambda x: False)
    model = adapted_model(dtype, gate=gate)
    expected, expected_logits = generate(model), logits(model)
    meft_ds.for_inference(model)
    for adapter in meft_ds.adapters(model):
        adapter.serving.mirror_host = False
    assert torch.equal(generate(model), expected)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(logits(model), expected_logits, rtol=tolerance, atol=tolerance)


def test_prefill_in_chunks_computes_what_one_chunk_does(monkeypatch: pytest.MonkeyPatch) -> None:
    model = meft_ds.for_inference(adapted_model())
    for adapter in meft_ds.adapters(model):
        adapter.serving.mirror_host = False
    whole = logits(model)
    calls = []
    over_rows = DeviceRows._over_rows
    monkeypatch.setattr(DeviceRows, "_over_rows", lambda self, *a: calls.append(1) or over_rows(self, *a))
    monkeypatch.setattr(meft_ds.inference, "CHUNK_BYTES", 1)  # one token per chunk
    chunked = logits(model)
    assert len(calls) == LAYERS * 2 * 8
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)


def test_bf16_rows_with_bf16_keys_take_two_bytes_and_still_route_on_the_device() -> None:
    model = adapted_model(torch.bfloat16)
    expected = logits(model)
    meft_ds.for_inference(model, exact_routing=False)
    for adapter in meft_ds.adapters(model):
        assert adapter.serving.keys.dtype == adapter.serving.values.dtype == torch.bfloat16
        assert adapter.serving.nbytes == 256 * 2 * 64 * 2
    before = traffic(model)
    got = logits(model)  # scores computed in bf16 may swap near ties: close to the training path, not equal
    assert traffic(model) == before
    # Mean relative deviation measured: < 0.05 on an Intel Xeon (AVX-512 BF16), 0.059 on an AMD EPYC (AVX2), where
    # bf16 matmuls take another path; the same with keys pre-rounded to bf16, so the swaps come from the scores.
    assert ((got.float() - expected.float()).abs().mean() / expected.float().abs().mean()).item() < 0.1


@pytest.mark.parametrize(
    ("dtype", "row_dtype", "key_bytes", "value_bytes"),
    [(torch.float32, "auto", 4, 4), (torch.bfloat16, "auto", 4, 2), (torch.float32, "bf16", 4, 2)],
)
def test_device_bytes_are_the_rows_in_the_dtype_they_travel_in(
    dtype: torch.dtype, row_dtype: str, key_bytes: int, value_bytes: int
) -> None:
    model = adapted_model(dtype, row_dtype=row_dtype)
    before = meft_ds.stats(model)["bytes_to_device"]
    meft_ds.for_inference(model)
    adapters = meft_ds.adapters(model)
    for adapter in adapters:
        rows = adapter.serving
        travel = adapter.config.row_torch_dtype(dtype)
        assert rows.values.dtype == travel and rows.keys.dtype == torch.float32  # exact routing: fp32 master keys
        assert rows.nbytes == 256 * 64 * (key_bytes + value_bytes)
        assert rows.keys.device == rows.values.device == adapter.router.weight.device
        assert torch.equal(rows.keys, adapter.store.keys)
        assert torch.equal(rows.values, adapter.store.values.to(travel))
    # placing them is counted once, as the bytes that travel to the device
    assert meft_ds.stats(model)["bytes_to_device"] - before == sum(a.serving.nbytes for a in adapters)


@pytest.mark.parametrize("mirror_host", [True, False], ids=["cpu routine", "accelerator routine"])
def test_no_host_traffic_per_generated_token(mirror_host: bool) -> None:
    with async_accelerator() as harness:
        model = adapted_model()
        generate(model)
        assert harness.deferred_copies > 0 and meft_ds.stats(model)["bytes_to_host"] > 0, "the training path copies"
        meft_ds.for_inference(model)
        for adapter in meft_ds.adapters(model):
            adapter.serving.mirror_host = mirror_host
        copies, pinned, waits = harness.deferred_copies, len(harness.pinned), len(harness.host_waits)
        harness.blocking_transfers.clear()  # placing the rows is one blocking copy per adapter
        before, calls = traffic(model), meft_ds.stats(model)["forward_calls"]
        generate(model)
        assert traffic(model) == before
        assert meft_ds.stats(model)["forward_calls"] - calls == LAYERS * NEW_TOKENS  # prefill + one per new token
        assert harness.deferred_copies == copies and len(harness.pinned) == pinned and len(harness.host_waits) == waits
        assert harness.blocking_transfers == []


def test_the_accelerator_routine_never_synchronizes_with_the_host() -> None:
    # on the meta device every value-dependent step (.item(), a data-dependent size, a copy to the host) raises
    with pytest.raises(RuntimeError, match="meta"):
        union_of(torch.empty(3, 4, dtype=torch.long, device="meta"))  # what the training path's union does
    for gate in ("logit", "none"):
        model = meft_ds.for_inference(adapted_model(gate=gate))
        adapter = meft_ds.adapters(model)[0]
        rows = adapter.serving
        meta = torch.device("meta")
        rows.keys, rows.values, rows.device = rows.keys.to(meta), rows.values.to(meta), meta
        adapter.router.to(meta)
        x = torch.empty(5, 64, device=meta)
        with torch.no_grad():
            out = adapter(x)
        assert out.shape == (5, 64) and out.device == meta


def test_training_is_refused_until_for_training() -> None:
    model = meft_ds.for_inference(adapted_model())
    batch = token_batch(batch=2, length=8)
    with pytest.raises(InferenceOnlyError, match=r"torch.no_grad\(\).*meft_ds.for_training\(model\)"):
        model(batch, labels=batch)
    with torch.inference_mode():
        model(batch)  # inference mode is fine

    meft_ds.for_training(model)
    assert all(a.serving is None for a in meft_ds.adapters(model))
    before = [a.store.rows.clone() for a in meft_ds.adapters(model)]
    model(batch, labels=batch).loss.backward()
    SparseRowAdam(meft_ds.adapters(model), lr=1e-2).step()
    assert all(not torch.equal(a.store.rows, b) for a, b in zip(meft_ds.adapters(model), before, strict=True))
    assert meft_ds.stats(model)["row_bytes_to_host"] > 0, "the training path is back"


def test_rows_written_after_for_inference_are_served() -> None:
    model = adapted_model()
    meft_ds.for_inference(model)
    served = logits(model)
    for adapter in meft_ds.adapters(model):  # what load_adapter does: write the rows, say so
        adapter.store.values.mul_(-1.0)
        adapter.rows_changed()
    changed = logits(model)
    assert not torch.allclose(changed, served)
    meft_ds.for_training(model)
    assert torch.equal(logits(model), changed)


def test_a_cast_after_for_inference_places_the_rows_again() -> None:
    model = meft_ds.for_inference(adapted_model())
    model.to(torch.bfloat16)
    got = generate(model)
    assert all(a.serving.values.dtype == torch.bfloat16 for a in meft_ds.adapters(model))
    meft_ds.for_training(model)
    assert torch.equal(generate(model), got)


def test_pre_retrieval_is_not_used_on_the_device() -> None:
    # pre-retrieval trades exactness for overlapping host copies; on the device there is nothing to overlap
    exact = generate(adapted_model())
    model = meft_ds.for_inference(adapted_model(prefetch_layers=1))
    assert torch.equal(generate(model), exact)


def test_a_model_without_adapters_is_refused() -> None:
    with pytest.raises(ValueError, match=r"no meft adapters.*load_adapter"):
        meft_ds.for_inference(tiny_model())


def test_evaluate_serves_from_the_device_with_the_training_paths_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny_model(layers=LAYERS).save_pretrained(tmp_path / "model")
    word_tokenizer(chat=True).save_pretrained(tmp_path / "model")
    meft_ds.save_adapter(adapted_model(), tmp_path / "adapter")
    evaluate = launch_script("evaluate")
    served = []
    for_inference = meft_ds.for_inference
    monkeypatch.setattr(meft_ds, "for_inference", lambda model: served.append(model) or for_inference(model))
    common = ["--model", str(tmp_path / "model"), "--adapter", str(tmp_path / "adapter"), "--no_base", "--limit", "6"]
    results = {}
    for routing, extra in (("device", []), ("host", ["--host_routing"])):
        out = tmp_path / "scores" / f"{routing}.json"  # its folder made before the model loads
        assert evaluate.main([*common, "--max_new_tokens", "8", "--output", str(out), *extra]) == 0
        results[routing] = json.loads(out.read_text())
        assert results[routing]["routing"] == routing
    assert len(served) == 1, "only the default run serves from the device"
    assert meft_ds.stats(served[0])["bytes_to_host"] == 0, "nothing went to the host while it generated"
    predictions = [p["prediction"] for p in results["device"]["after"]["predictions"]]
    assert all(predictions), "the tiny model answers something"
    assert predictions == [p["prediction"] for p in results["host"]["after"]["predictions"]]


@pytest.mark.parametrize("method", ["lora", "parallel_adapter"])
def test_evaluate_loads_the_launchers_baselines_and_answers_as_the_trained_model(tmp_path: Path, method: str) -> None:
    """A ``launch/train.py --method lora|parallel_adapter`` export evaluates to the answers of the model that wrote it
    (its adapter made non-trivial here: LoRA's B and the adapter's values start at zero)."""

    tokenizer = word_tokenizer(chat=True)
    tiny_model(layers=LAYERS).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    torch.manual_seed(0)
    trained = prepare_baseline(method, tiny_model(layers=LAYERS), lora_r=4, adapter_neurons=16)
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if param.requires_grad and ("lora_B" in name or name.endswith("values")):
                param.normal_(0, 0.5)
    export_baseline(method, trained, tokenizer, tmp_path / "run")
    assert exported_method(tmp_path / "run") == method
    examples = load_examples("facts", "eval", limit=6)
    expected = evaluate_generation(trained.eval(), tokenizer, examples, max_new_tokens=8, batch_size=32)
    evaluate = launch_script("evaluate")
    out = tmp_path / "scores.json"
    argv = ["--model", str(tmp_path / "model"), "--adapter", str(tmp_path / "run"), "--limit", "6"]
    argv += ["--dtype", "fp32"]  # the reference's (on a CPU with AMX, "auto" would be bf16)
    assert evaluate.main([*argv, "--max_new_tokens", "8", "--output", str(out)]) == 0
    scores = json.loads(out.read_text())
    assert scores["method"] == method
    after = [p["prediction"] for p in scores["after"]["predictions"]]
    assert after == [p["prediction"] for p in expected["predictions"]]
    assert after != [p["prediction"] for p in scores["before"]["predictions"]], "the adapter changes the answers"


def test_a_full_fine_tuning_export_evaluates_as_a_model(tmp_path: Path) -> None:
    """``--method full`` exports the whole model with its tokenizer: ``--model`` loads it (without the tokenizer, the
    folder did not load) and it answers as the model that wrote it, on the run's held-out set (its results.json:
    here 40 facts of seed 2)."""

    tokenizer = word_tokenizer(chat=True)
    torch.manual_seed(0)
    trained = prepare_baseline("full", tiny_model(layers=LAYERS), lora_r=4, adapter_neurons=16)
    export_baseline("full", trained, tokenizer, tmp_path / "run")
    assert exported_method(tmp_path / "run") == "full"
    (tmp_path / "run" / "results.json").write_text(json.dumps({"dataset": "facts", "facts": 40, "seed": 2}))
    examples = load_examples("facts", "eval", limit=6, facts=40, seed=2)
    expected = evaluate_generation(trained.eval(), tokenizer, examples, max_new_tokens=8, batch_size=32)
    out = tmp_path / "scores.json"
    argv = ["--model", str(tmp_path / "run"), "--limit", "6", "--max_new_tokens", "8", "--output", str(out)]
    argv += ["--dtype", "fp32"]  # the reference's (on a CPU with AMX, "auto" would be bf16)
    assert launch_script("evaluate").main(argv) == 0
    assert json.loads(out.read_text())["before"]["predictions"] == expected["predictions"]


@pytest.mark.parametrize("amx", [True, False])
def test_evaluate_computes_in_the_runs_dtype_else_as_training_would(monkeypatch: pytest.MonkeyPatch, amx: bool) -> None:
    """A run's adapter is scored in the dtype it trained in; without a record, in what the shipped config's "auto"
    trains in on this machine (on a CPU: bf16 with AMX, else fp32); --dtype wins over both."""
    monkeypatch.setattr(meft_ds.ds_config, "cpu_has_native_bf16", lambda: amx)
    monkeypatch.setattr(meft_ds.ds_config, "cpu_has_amx_bf16", lambda: amx)
    evaluate = launch_script("evaluate")
    args = evaluate.parse_args([])
    assert evaluate.model_dtype(args, {}) == (torch.bfloat16 if amx else torch.float32)
    assert evaluate.model_dtype(args, {"dtype": "fp32"}) == torch.float32
    assert evaluate.model_dtype(evaluate.parse_args(["--dtype", "bf16"]), {"dtype": "fp32"}) == torch.bfloat16


def test_evaluate_refuses_a_whole_model_as_adapter(tmp_path: Path) -> None:
    tiny_model().save_pretrained(tmp_path / "full_run")  # what --method full exports
    evaluate = launch_script("evaluate")
    with pytest.raises(UsageError, match=r"holds a whole model \(a --method full run\)\. Fix: evaluate it as --model"):
        evaluate.main(["--adapter", str(tmp_path / "full_run"), "--limit", "1"])


def test_evaluate_refuses_a_run_that_held_no_file_out(tmp_path: Path) -> None:
    """A run on a local file with --no_eval recorded no held-out set: its training file is not one to score."""
    (tmp_path / "results.json").write_text(json.dumps({"dataset": "my_data.jsonl", "eval_dataset": None}))
    evaluate = launch_script("evaluate")
    with pytest.raises(UsageError, match=r"its run trained on my_data\.jsonl and held no file out .* Fix: pass --data"):
        evaluate.main(["--adapter", str(tmp_path), "--limit", "1"])


def test_evaluate_answers_questions_given_on_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--prompt: the base model's and the adapted model's answers to the user's own questions, printed and written."""
    tiny_model(layers=LAYERS).save_pretrained(tmp_path / "model")
    word_tokenizer(chat=True).save_pretrained(tmp_path / "model")
    adapted = adapted_model()
    meft_ds.save_adapter(adapted, tmp_path / "adapter")
    questions = ["Where was Drical Calxan born?", "Who owns a pet called Grizzop?"]
    evaluate = launch_script("evaluate")
    out = tmp_path / "answers.json"
    argv = ["--model", str(tmp_path / "model"), "--adapter", str(tmp_path / "adapter"), "--max_new_tokens", "6"]
    argv += ["--dtype", "fp32"]
    assert evaluate.main([*argv, "--prompt", questions[0], "--prompt", questions[1], "--output", str(out)]) == 0
    written = json.loads(out.read_text())
    expected = evaluate_generation(
        adapted, word_tokenizer(chat=True), [Example(q, []) for q in questions], max_new_tokens=6
    )
    assert written["after"] == {"predictions": expected["predictions"]}  # answers, no scores
    assert [p["prompt"] for p in written["before"]["predictions"]] == questions
    printed = capsys.readouterr().out
    for phase, label in (("before", "before (base model)"), ("after", f"after  ({tmp_path / 'adapter'})")):
        for answer in written[phase]["predictions"]:
            assert f"{label}: {answer['prompt']} -> {answer['prediction']}\n" in printed
    with pytest.raises(SystemExit):  # its own questions, not a dataset's
        evaluate.parse_args([*argv, "--prompt", questions[0], "--dataset", "facts"])


def test_evaluate_loads_the_lora_saved_beside_meft(tmp_path: Path) -> None:
    """A PEFT model's export (MEFT's adapter, LoRA's in ``peft/``: ``MeftModel.save_pretrained``,
    ``MeftTrainer.save_model``) evaluates to the answers of the model that wrote it: evaluate loaded MEFT's part
    alone, and answered as a model that was never trained."""
    from peft import LoraConfig, get_peft_model

    tokenizer = word_tokenizer(chat=True)
    tiny_model(layers=LAYERS).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    torch.manual_seed(0)
    trained = get_peft_model(tiny_model(layers=LAYERS), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    meft_ds.inject(trained, MEFT)
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    for adapter in meft_ds.adapters(trained):
        adapter.store.values.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(adapter.layer_index))
    meft_ds.MeftModel(trained).save_pretrained(tmp_path / "run")
    examples = load_examples("facts", "eval", limit=6)

    def answers(model: torch.nn.Module) -> list[str]:
        result = evaluate_generation(model.eval(), tokenizer, examples, max_new_tokens=8, batch_size=32)
        return [p["prediction"] for p in result["predictions"]]

    expected = answers(trained)
    assert expected != answers(meft_ds.load_adapter(tiny_model(layers=LAYERS), tmp_path / "run")), "LoRA matters"
    out = tmp_path / "scores.json"
    argv = ["--model", str(tmp_path / "model"), "--adapter", str(tmp_path / "run"), "--limit", "6", "--no_base"]
    argv += ["--dtype", "fp32"]
    assert launch_script("evaluate").main([*argv, "--max_new_tokens", "8", "--output", str(out)]) == 0
    assert [p["prediction"] for p in json.loads(out.read_text())["after"]["predictions"]] == expected
