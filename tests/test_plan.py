"""meft_ds.plan's figures against what the code itself allocates, moves and saves on small models, and its CLI.

The plan models the accelerator's path: the masked adapter (dense GEMMs over ``U`` with ``(T, |U|)`` masks). On the CPU
the adapter takes meft_ds's top-K kernel instead, so the tests that compare saved tensors force the masked path.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from async_accelerator import async_accelerator
from tiny_models import tiny_config, tiny_model, token_batch

import meft_ds
import meft_ds.adapter
from meft_ds.activations import (
    analytic_saved_bytes,
    linear_of,
    measure_saved_bytes,
    meta_model,
    saved_bytes_counter,
)
from meft_ds.adapter import MaskedAdapterFunction
from meft_ds.ds_config import load_deepspeed_config
from meft_ds.models import ModelLoadError
from meft_ds.pinned import RINGS
from meft_ds.plan import (
    MemoryPlan,
    Setup,
    masked_path_bytes,
    plan,
    plan_items,
    staging_buffers,
)

ROOT = Path(__file__).resolve().parents[1]
BATCH, SEQ = 3, 20  # 60 tokens; sizes that are not powers of two, so the staging buffers' rounding shows
# T*K = 960 draws from 48 rows: the union is every row, in the plan's estimate and in the real routing, so the plan's
# |U|-driven figures can be held to the code's counters (the estimate itself is tested separately). The cache holds
# 34 of the 48 rows of each layer.
MEFT = {"num_neurons": 48, "top_k": 16, "cache_mb": 0.05}
DS_CONFIG = {
    "bf16": {"enabled": True},
    "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True}},
    "meft": MEFT,
}


def within(planned: float, measured: float, tolerance: float = 0.10) -> bool:
    return abs(planned - measured) <= tolerance * measured


@pytest.fixture(scope="module")
def tiny_plan() -> MemoryPlan:
    return plan(tiny_config(), DS_CONFIG, batch_size=BATCH, seq_len=SEQ)


@pytest.fixture(scope="module")
def trained_step() -> dict[str, Any]:
    """One real forward (saved tensors counted) + backward + gradient collection of the injected tiny model in bf16,
    on the masked path the plan models, through an accelerator with streams (tests/async_accelerator.py): the pinned
    staging a GPU run allocates (a CPU-only run gathers rows straight into the tensors it computes with)."""
    with pytest.MonkeyPatch.context() as patch, async_accelerator():
        patch.setattr(meft_ds.adapter, "computes_over_top_k", lambda x: False)
        torch.manual_seed(0)
        model = meft_ds.inject(tiny_model().to(torch.bfloat16).train(), MEFT)
        ids = token_batch(BATCH, SEQ)
        with saved_bytes_counter(model) as saved:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        for adapter in meft_ds.adapters(model):
            adapter.collect_row_grads()
    return {"model": model, "saved": saved[0], "stats": meft_ds.stats(model)}


def test_base_model_bytes_are_the_real_model_s(tiny_plan: MemoryPlan) -> None:
    real = tiny_model().to(torch.bfloat16)  # as DeepSpeed's bf16 engine casts it (buffers too: rotary inv_freq)
    assert tiny_plan.model.params == real.num_parameters()
    allocated = sum({t.untyped_storage().data_ptr(): t.nbytes for t in [*real.parameters(), *real.buffers()]}.values())
    assert within(tiny_plan.bytes_of("frozen base model"), allocated, 0.001)
    tied = tiny_config()
    tied.tie_word_embeddings = True  # SmolLM2 ties them: counted once, as the real model holds them once
    untied = meta_model(tiny_config(), torch.bfloat16)
    assert meta_model(tied, torch.bfloat16).num_parameters() == untied.num_parameters() - 1000 * 64


@pytest.mark.parametrize("zero3", [False, True], ids=["torch_linear", "zero3_linear"])
@pytest.mark.parametrize(
    "family", ["llama", "gpt2", "mixtral", "qwen2_moe", "gpt_oss", "gemma3", "llama4_text", "qwen3_next", "jamba"]
)
def test_base_activations_match_a_real_cpu_forward(family: str, zero3: bool) -> None:
    """The meta measurement (with flash attention standing in for SDPA) equals the same accounting on a real forward
    of the base model with weights, in bf16, on this CPU (whose SDPA runs flash kernels too), with torch's linear and
    with the one ZeRO-3 engines install. GPT-2 runs in eval mode: with attention dropout the CPU's SDPA falls back to
    its math path, the accelerator's flash kernel does not."""
    config = tiny_config(family, layers=3)
    adapted = [1, 2]
    ids = token_batch(BATCH, SEQ)
    real = tiny_model(family, layers=3).to(torch.bfloat16).train(family == "llama").requires_grad_(False)
    measured = measure_saved_bytes(real, ids, adapted, zero3_linear=zero3)
    on_meta = meta_model(config, torch.bfloat16).train(family == "llama")
    planned = measure_saved_bytes(on_meta, ids.to("meta"), adapted, zero3_linear=zero3)
    assert planned.per_layer[0] == measured.per_layer[0] == 0, "nothing before the first adapter needs a gradient"
    assert within(planned.total, measured.total), (planned, measured)
    assert all(within(p, m) for p, m in zip(planned.per_layer[1:], measured.per_layer[1:], strict=True))
    if family == "llama":  # the analytic fallback is written for LLaMA-style decoders
        fallback = analytic_saved_bytes(config, torch.bfloat16, BATCH * SEQ, adapted, zero3_linear=zero3)
        assert within(fallback.total, measured.total), (fallback, measured)


def test_zero_3_plans_the_inputs_its_linears_keep() -> None:
    """Under ZeRO-3 (memory_efficient_linear, on by default) every linear keeps its input, so the plan's activations
    grow; they do not depend on whether the process made a ZeRO-3 engine before (which leaves DeepSpeed's linear in
    place)."""
    stage3 = {**DS_CONFIG, "zero_optimization": {"stage": 3}}
    without = {**DS_CONFIG, "zero_optimization": {"stage": 3, "memory_efficient_linear": False}}
    torch_linear = plan(tiny_config(), DS_CONFIG, batch_size=BATCH, seq_len=SEQ).model.saved
    zero3 = plan(tiny_config(), stage3, batch_size=BATCH, seq_len=SEQ).model.saved
    assert zero3.total > torch_linear.total
    assert plan(tiny_config(), without, batch_size=BATCH, seq_len=SEQ).model.saved == torch_linear
    with linear_of(zero3=True):  # a process in which a ZeRO-3 engine was made
        assert plan(tiny_config(), DS_CONFIG, batch_size=BATCH, seq_len=SEQ).model.saved == torch_linear
    with linear_of(zero3=False):
        assert plan(tiny_config(), stage3, batch_size=BATCH, seq_len=SEQ).model.saved == zero3


def test_whole_forward_saves_what_the_plan_says(tiny_plan: MemoryPlan, trained_step: dict) -> None:
    """Base activations + fetched rows + the masked path's (T, |U|) tensors = what the real injected model's forward
    keeps for backward."""
    measured, layers = trained_step["saved"], tiny_plan.model.adapters
    adapter = (tiny_plan.bytes_of("fetched rows") + tiny_plan.bytes_of("masked path")) // layers
    planned = [base + adapter for base in tiny_plan.model.saved.per_layer]
    assert all(within(p, m) for p, m in zip(planned, measured.per_layer, strict=True)), (planned, measured)
    assert within(tiny_plan.model.saved.outside, measured.outside)


def test_masked_path_bytes_match_the_autograd_function() -> None:
    tokens, union, dim = 96, 300, 64
    setup = Setup(meft_ds.MeftConfig(num_neurons=1024, top_k=8), batch_size=tokens, seq_len=1, compute=torch.bfloat16)
    x = torch.randn(tokens, dim, dtype=torch.bfloat16, requires_grad=True)
    gate = torch.randn(tokens, union, dtype=torch.bfloat16, requires_grad=True)
    rows = torch.randn(union, 2, dim, dtype=torch.bfloat16, requires_grad=True)
    mask = torch.rand(tokens, union) < 0.1
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storages[tensor.untyped_storage()._cdata] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        MaskedAdapterFunction.apply(x, gate, rows, mask, lambda grads: None)
    kept = sum(storages.values()) - x.nbytes - gate.nbytes  # x and gate: the layer's input and router output
    planned = masked_path_bytes(setup, union) - union * 8 - tokens * union * 2 + rows.nbytes  # without the gate
    assert within(planned, kept, 0.01), (planned, kept)


def test_fetched_rows_match_the_transfer_counters(tiny_plan: MemoryPlan, trained_step: dict) -> None:
    assert tiny_plan.union == MEFT["num_neurons"] == trained_step["stats"]["rows_fetched"] / 2
    assert within(tiny_plan.bytes_of("fetched rows"), trained_step["stats"]["row_bytes_to_device"])


def test_union_estimate_is_an_upper_estimate_of_real_routing() -> None:
    """With T*K well below r, routing concentrates on fewer rows than uniform draws would reach: the plan's |U| must
    not be below the measured union, and stays within 1.5x of it on random tiny models (measured: 0.8-0.9x; the real
    SmolLM2 concentrates more, about 0.5x). Given the measured union, the plan's row bytes are the counters'."""
    settings = {"num_neurons": 1024, "top_k": 8}
    model = meft_ds.inject(tiny_model().to(torch.bfloat16), settings)
    ids = token_batch(2, SEQ)
    with torch.no_grad():
        model(input_ids=ids)
    stats = meft_ds.stats(model)
    measured = stats["rows_fetched"] / len(meft_ds.adapters(model))
    ds_config = {**DS_CONFIG, "meft": settings}
    estimate = plan(tiny_config(), ds_config, batch_size=2, seq_len=SEQ)
    assert measured <= estimate.union <= 1.5 * measured, (estimate.union, measured)
    given = plan(tiny_config(), ds_config, batch_size=2, seq_len=SEQ, union=round(measured))
    assert within(given.bytes_of("fetched rows"), stats["row_bytes_to_device"], 0.01)


def test_store_and_pinned_buffers_match_the_allocations(tiny_plan: MemoryPlan, trained_step: dict) -> None:
    adapters = meft_ds.adapters(trained_step["model"])
    assert tiny_plan.bytes_of("row stores") == sum(a.store.nbytes for a in adapters)
    buffers = adapters[0].transfer.buffers
    assert all(a.transfer.buffers is buffers for a in adapters), "one set of rings for the whole model"
    allocated: dict[tuple[str, int], int] = {}  # bytes of each ring slot used so far (all its parts)
    for (purpose, ring_slot, _part), buffer in buffers._buffers.items():
        allocated[purpose, ring_slot] = allocated.get((purpose, ring_slot), 0) + buffer.nbytes
    setup, dim = tiny_plan.setup, tiny_plan.model.dim
    cached = adapters[0].transfer.cache.capacity
    per_slot = staging_buffers(setup, dim, tiny_plan.union, cached)
    assert set(per_slot) == {purpose for purpose, _ in allocated}, "the plan must know every pinned buffer"
    for purpose, size in per_slot.items():  # the largest slot is the size the plan gives a slot (indices: smaller too)
        slots = [nbytes for (p, _), nbytes in allocated.items() if p == purpose]
        assert 0 < len(slots) <= RINGS[purpose]
        assert within(size, max(slots)), (purpose, size, slots)
    assert tiny_plan.bytes_of("staging buffers") == sum(RINGS[name] * size for name, size in per_slot.items())


def test_nvme_tier_bytes_match_the_stores(tmp_path: Path) -> None:
    """With the NVMe tier the plan puts values and moments on NVMe, the keys in RAM and the rest of the RAM budget in
    the read areas: what the stores' files and buffers hold."""
    store = {"device": "nvme", "nvme_path": str(tmp_path), "ram_budget_mb": 1.0}
    meft = {"num_neurons": 1024, "top_k": 8, "store": store}
    nvme_plan = plan(tiny_config(), {**DS_CONFIG, "meft": meft}, batch_size=BATCH, seq_len=SEQ)
    stores = [adapter.store for adapter in meft_ds.adapters(meft_ds.inject(tiny_model(), meft))]
    on_disk = sum(Path(path).stat().st_size for s in stores for path in s.files.values())
    assert [item.tier for item in nvme_plan.items if item.name.startswith("row stores")] == ["nvme"]
    assert nvme_plan.bytes_of("row stores") == on_disk
    assert nvme_plan.bytes_of("NVMe tier: keys") == sum(s.keys.nbytes for s in stores)
    assert nvme_plan.bytes_of("NVMe tier: read areas") == sum(s._read_area.nbytes for s in stores)
    assert nvme_plan.bytes_of("NVMe tier: optimizer-step buffers") == 2 * 5 * stores[0].keys.nbytes


def test_cache_bytes_match_the_device_cache(tiny_plan: MemoryPlan, trained_step: dict) -> None:
    adapters = meft_ds.adapters(trained_step["model"])
    resident = sum(a.transfer.device_bytes for a in adapters)
    assert resident > 0 and within(tiny_plan.bytes_of("device row cache"), resident)
    without = dataclasses.replace(tiny_plan.setup, meft=meft_ds.MeftConfig(num_neurons=48, top_k=16))
    assert not any(item.name == "device row cache" for item in plan_items(without, tiny_plan.model))


def test_model_config_from_a_folder_and_a_file(tmp_path: Path) -> None:
    tiny_config().save_pretrained(tmp_path)
    from_folder = plan(str(tmp_path), DS_CONFIG, batch_size=1, seq_len=8)
    from_file = plan(str(tmp_path / "config.json"), DS_CONFIG, batch_size=1, seq_len=8)
    assert from_folder.model.params == from_file.model.params == tiny_model().num_parameters()
    with pytest.raises(ModelLoadError, match="not a built-in name"):
        plan("no-such-model", DS_CONFIG, batch_size=1, seq_len=8)


@pytest.mark.slow
def test_smollm2_plan_is_within_ten_percent_of_what_the_code_measures() -> None:
    """The main job's model and shape (SmolLM2-135M, ds_configs/meft.json, micro-batch 8 x 64 of real facts text, no
    padding), on the masked path the plan models: every figure within 10% of the code's own counters,
    allocations and saved tensors, given the union the routing really made (the uniform estimate is an upper bound)."""
    from meft_ds.data import load_examples
    from meft_ds.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(None)  # fp32, as the main job computes on a CPU (bf16 is slower)
    config = load_deepspeed_config(ROOT / "ds_configs" / "meft.json")
    config["bf16"]["enabled"] = False
    config["meft"]["cache_mb"] = 64
    text = " ".join(f"{e.prompt} {e.answers[0]}" for e in load_examples("facts", "train")[:200])
    ids = torch.tensor(tokenizer(text)["input_ids"][: 8 * 64]).view(8, 64)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(meft_ds.adapter, "computes_over_top_k", lambda x: False)
        meft_ds.inject(model.train(), config["meft"])
        with saved_bytes_counter(model) as saved:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    adapters = meft_ds.adapters(model)
    stats = meft_ds.stats(model)
    union = round(stats["rows_fetched"] / len(adapters))
    estimate = plan(model.config, config, batch_size=8, seq_len=64)
    given = plan(model.config, config, batch_size=8, seq_len=64, union=union)
    assert union <= estimate.union, "the uniform estimate is an upper bound"
    assert within(given.bytes_of("fetched rows"), stats["row_bytes_to_device"])
    assert within(given.bytes_of("row stores"), sum(a.store.nbytes for a in adapters))
    assert within(given.bytes_of("device row cache"), sum(a.transfer.device_bytes for a in adapters))
    params = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    assert within(given.bytes_of("frozen base model"), params)
    per_layer = (given.bytes_of("fetched rows") + given.bytes_of("masked path")) // len(adapters)
    planned = given.model.saved.total + per_layer * len(adapters)
    assert within(planned, saved[0].total), (planned, saved[0].total)
