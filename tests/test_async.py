"""The accelerator path under a CPU accelerator that enforces CUDA's asynchrony (tests/async_accelerator.py): results
are bit-identical to the synchronous run, copies are waited for where they are used and nowhere else, and deleting
any one of those waits is caught."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from async_accelerator import AsyncHazard, async_accelerator
from tiny_models import tiny_model, token_batch

import meft_ds
from meft_ds import MeftConfig, SparseKeyExpertAdapter, SparseRowAdam

MEFT = {"num_neurons": 128, "top_k": 8, "seed": 4}
DIM = 32


def train_tiny(
    meft: dict, *, steps: int = 2, micro_steps: int = 2, layers: int = 3, checkpointing: bool = False
) -> tuple[list[torch.Tensor], list[float]]:
    """A few optimizer steps of a tiny LLaMA in a plain loop (``checkpointing``: each layer's forward recomputed in
    its backward); the stores' rows and the losses."""
    model = tiny_model(layers=layers)
    if checkpointing:
        model.train().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = meft_ds.inject(model, {**MEFT, **meft})
    sparse = SparseRowAdam(meft_ds.adapters(model), lr=1e-2)
    dense = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(steps):
        for micro in range(micro_steps):
            batch = token_batch(batch=2, length=8, seed=step * micro_steps + micro)
            loss = model(batch, labels=batch).loss / micro_steps
            loss.backward()
            losses.append(loss.item())
        sparse.step()
        dense.step()
        sparse.zero_grad()
        dense.zero_grad()
    return [a.store.full_rows().clone() for a in meft_ds.adapters(model)], losses


SCENARIOS = {
    "plain": {},
    "6 layers": {"layers": 6},  # more layers than the ring of gradient buffers: hand-overs complete in the backward
    "bf16 rows": {"row_dtype": "bf16"},
    "cache": {"cache_mb": 0.02},  # a few rows per layer: evictions flush gradients during the forward
    "prefetch": {"prefetch_layers": 1},
    "cache and prefetch": {"cache_mb": 1, "prefetch_layers": 2},
    "activation checkpointing": {"checkpointing": True},  # rows fetched again in the backward
    "checkpointing and cache": {"checkpointing": True, "cache_mb": 0.02},
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_training_is_bit_identical_to_the_synchronous_run(name: str) -> None:
    meft = dict(SCENARIOS[name])
    shape = {"layers": meft.pop("layers", 3), "checkpointing": meft.pop("checkpointing", False)}
    rows, losses = train_tiny(meft, **shape)
    with async_accelerator() as harness:
        async_rows, async_losses = train_tiny(meft, **shape)
    assert harness.deferred_copies > 0, "the run must have exercised the asynchronous path"
    assert losses == async_losses
    for expected, got in zip(rows, async_rows, strict=True):
        assert torch.equal(expected, got)


def test_nvme_store_is_bit_identical_to_the_synchronous_run(tmp_path: Path) -> None:
    store = {"device": "nvme", "ram_budget_mb": 1.0}
    rows, losses = train_tiny({"store": {**store, "nvme_path": str(tmp_path / "sync")}})
    with async_accelerator():
        async_rows, async_losses = train_tiny({"store": {**store, "nvme_path": str(tmp_path / "async")}})
    assert losses == async_losses
    for expected, got in zip(rows, async_rows, strict=True):
        assert torch.equal(expected, got)


def test_adapter_transfer_cache_prefetch_nvme_engine_and_serving_tests_pass_under_the_harness() -> None:
    # besides the adapter's own: DeepSpeed's ZeRO stages 1-3, offload, fp16 overflow skips and checkpoints, the
    # attached plugin, and serving with the rows placed on the device, all with CUDA's asynchronous copies
    files = ["test_adapter.py", "test_traffic.py", "test_cache.py", "test_prefetch.py", "test_nvme.py"]
    files += ["test_engine.py", "test_fp16.py", "test_accumulator.py", "test_sparse_adam.py", "test_attach.py"]
    files += ["test_inference.py"]
    tests = Path(__file__).parent
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--async-accelerator", *files],
        cwd=tests, env={k: v for k, v in os.environ.items() if k != "MASTER_PORT"}, capture_output=True, text=True,
        check=False,
    )  # fmt: skip
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-2000:]
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in summary and "skipped" not in summary, summary


def test_a_deepspeed_step_with_cache_and_prefetch_is_bit_identical(tmp_path: Path) -> None:
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
        "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
        "meft": {**MEFT, "cache_mb": 1, "prefetch_layers": 1},
    }

    def run() -> tuple[list[torch.Tensor], list[torch.Tensor], list[float]]:
        engine, *_ = meft_ds.initialize(model=tiny_model(layers=3), config=config)
        losses = []
        for micro in range(4):
            batch = token_batch(batch=2, length=8, seed=micro)
            loss = engine(batch, labels=batch).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        adapters = meft_ds.adapters(engine.module)
        routers = [a.router.weight.detach().clone() for a in adapters]
        return [a.store.full_rows().clone() for a in adapters], routers, losses

    expected = run()
    with async_accelerator() as harness:
        got = run()
    assert harness.deferred_copies > 0
    assert expected[2] == got[2]
    for a, b in zip(expected[0] + expected[1], got[0] + got[1], strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- the numbered defects
def adapter_step(adapter: SparseKeyExpertAdapter, x: torch.Tensor) -> torch.Tensor:
    """Forward and backward of one adapter; its output."""
    x = x.clone().requires_grad_(True)
    out = adapter(x)
    out.pow(2).sum().backward()
    return out.detach()


def test_rows_are_written_only_into_memory_of_the_stream_that_writes_them() -> None:
    # defect 1: the rows' device memory was allocated on the compute stream and written on the side stream without
    # waiting: the caching allocator may hand out a block that kernels queued on the compute stream still read
    with async_accelerator():
        adapter = SparseKeyExpertAdapter(DIM, MeftConfig(num_neurons=64, top_k=8), layer_index=0)
        adapter_step(adapter, torch.randn(6, DIM))


def test_side_streams_are_created_on_the_device_of_the_rank_after_injection() -> None:
    # defect 2: streams were created at inject time, before deepspeed.initialize sets each rank's device
    with async_accelerator() as harness:
        model = meft_ds.inject(tiny_model(), MEFT)
        created = set(harness.streams)
        harness.set_device(1)  # what deepspeed.initialize does on the second GPU of a node
        batch = token_batch(batch=1, length=8)
        model(batch, labels=batch).loss.backward()
        side = [s for i, s in harness.streams.items() if i not in created and s is not harness.default_stream(1)]
    assert len(side) == len(meft_ds.adapters(model)), "one side stream per adapter, created at its first copy"
    assert {s.device_index for s in side} == {1}


@pytest.mark.parametrize("cache_mb", [0, 0.02])
def test_no_blocking_transfer_and_no_wait_for_current_work_in_the_backward(cache_mb: float) -> None:
    # defect 3: index and flag copies were blocking pageable copies (a full stream synchronisation each)
    with async_accelerator() as harness:
        model = meft_ds.inject(tiny_model(layers=3), {**MEFT, "cache_mb": cache_mb})
        for seed in range(3):
            batch = token_batch(batch=2, length=8, seed=seed)
            loss = model(batch, labels=batch).loss
            backward_started, waits_before = harness.tick(), len(harness.host_waits)
            loss.backward()
            # a micro-step's row gradients reach the store at the next micro-step at the earliest
            assert all(wait.newest < backward_started for wait in harness.host_waits[waits_before:])
        assert harness.blocking_transfers == []
        assert harness.host_waits, "the forward waits for its routing inputs"


@pytest.mark.parametrize("cache_mb", [0, 0.02])
def test_gradients_dropped_while_in_flight_never_reach_the_store(cache_mb: float) -> None:
    # zero_grad between a backward and the step (gradients still crossing to the host, or accumulating in the cache)
    # drops them: the step after the next backward equals a step after that backward alone
    def rows_before_and_after(micro_steps: list[int], harness: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        with async_accelerator() if harness else contextlib.nullcontext():
            model = meft_ds.inject(tiny_model(layers=3), {**MEFT, "cache_mb": cache_mb})
            adapters = meft_ds.adapters(model)
            before = [a.store.full_rows().clone() for a in adapters]
            sparse = SparseRowAdam(adapters, lr=1e-2)
            for index, seed in enumerate(micro_steps):
                batch = token_batch(batch=2, length=8, seed=seed)
                model(batch, labels=batch).loss.backward()
                if index < len(micro_steps) - 1:
                    if harness and not cache_mb:  # with the cache, most wait in it instead
                        assert any(a.transfer._handovers for a in adapters), "hand-overs still in flight"
                    sparse.zero_grad()
            sparse.step()
            return before, [a.store.full_rows().clone() for a in adapters]

    initial, alone = rows_before_and_after([1], harness=False)
    assert any(not torch.equal(a, b) for a, b in zip(alone, initial, strict=True)), "the step changed rows"
    _, dropped_first = rows_before_and_after([0, 1], harness=True)
    assert all(torch.equal(a, b) for a, b in zip(dropped_first, alone, strict=True))


def test_pre_retrieval_waits_once_per_layer_with_the_layers_own_routing() -> None:
    # defect 3: the pre-retrieval path synchronized its routing copies at once, after the FFN's kernels were queued
    with async_accelerator() as harness:
        model = meft_ds.inject(tiny_model(layers=3), {**MEFT, "prefetch_layers": 1})
        with torch.no_grad():
            model(token_batch(batch=2, length=8))
    # layer 0 routes itself (its wait covers layer 1's routing inputs, started before its FFN too), layer 1 routes
    # layer 2 (prefetch), layer 2 uses what layer 1 fetched: two waits, none right after a copy was started
    routing_waits = [wait for wait in harness.host_waits if "_route" in wait.caller]
    assert len(routing_waits) == 2, harness.host_waits
    assert harness.blocking_transfers == []


def test_masked_adapter_backward_under_autocast_matches_fp32() -> None:
    # defect 5: the hand-written backward ran outside the forward's autocast state and mixed dtypes
    from meft_ds.adapter import MaskedAdapterFunction

    tokens, n = 10, 24
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, DIM, generator=generator)
    gate = torch.randn(tokens, n, generator=generator)
    rows = torch.randn(n, 2, DIM, generator=generator) * 0.3
    mask = torch.rand(tokens, n, generator=generator) < 0.3
    grad_out = torch.randn(tokens, DIM, generator=generator)
    results = []
    for autocast in (False, True):
        inputs = [x.clone().requires_grad_(True), gate.clone().requires_grad_(True)]
        sunk = []
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = MaskedAdapterFunction.apply(*inputs, rows.clone().requires_grad_(), mask, sunk.append)
        out.float().backward(grad_out)
        assert inputs[0].grad.dtype == torch.float32 and sunk[0].dtype == rows.dtype
        results.append([out.float(), inputs[0].grad, inputs[1].grad, sunk[0]])
    for fp32, bf16 in zip(*results, strict=True):  # bf16 keeps 8 bits of mantissa: ~1% of the largest values
        torch.testing.assert_close(bf16, fp32, rtol=0.05, atol=0.05 * float(fp32.abs().max()))


# ------------------------------------------------------------------------------------ deleting a wait is caught
WAITS = [
    ("transfer", "current.wait_event(self.copied)"),
    ("transfer", "self.rows.record_stream(current)"),
    ("transfer", "side.wait_event(produced)"),
    ("transfer", "grads.record_stream(side)"),
    ("transfer", "self.copied.synchronize()"),
    ("pinned", "release()\n"),
    ("adapter", "pending.copied.synchronize()"),
]


def mutated(module_name: str, line: str) -> types.ModuleType:
    """A copy of ``meft_ds.<module_name>`` with the statement ``line`` replaced by ``pass``."""
    original = sys.modules[f"meft_ds.{module_name}"]
    source = Path(original.__file__).read_text()
    statement = line.split("\n")[0]
    assert source.count(line) == 1, f"{line!r} must name exactly one statement of {module_name}.py"
    start = source.index(line)
    source = source[:start] + "pass" + source[start + len(statement) :]
    module = types.ModuleType(original.__name__)
    module.__file__ = original.__file__
    exec(compile(source, original.__file__, "exec"), module.__dict__)
    return module


def two_fetches_and_steps(adapter_class: type) -> list[torch.Tensor]:
    """Two uploads in flight at once, then two forward/backward passes and the gradients' hand-over: what every
    wait guards."""
    adapter = adapter_class(DIM, MeftConfig(num_neurons=64, top_k=8), layer_index=0)
    adapter.store.values.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    starts = range(0, 30, 10)  # one more upload than the ring of staging buffers holds
    uploads = [
        adapter.transfer.fetch(torch.arange(i, i + 10), dtype=torch.float32, device=torch.device("cpu")) for i in starts
    ]
    results = [upload.wait().clone() for upload in uploads]
    for start, rows in zip(starts, results, strict=True):
        assert torch.equal(rows, adapter.store.rows[start : start + 10])
    generator = torch.Generator().manual_seed(2)
    for _ in range(5):  # one more hand-over of row gradients than their ring of buffers holds
        results.append(adapter_step(adapter, torch.randn(6, DIM, generator=generator)))
    adapter.collect_row_grads()
    return [*results, adapter.store.accumulated_grads()[1].clone()]


@pytest.mark.parametrize(("module_name", "line"), WAITS, ids=[w[1].split("\n")[0] for w in WAITS])
def test_deleting_any_wait_is_caught(module_name: str, line: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from meft_ds import adapter as adapter_module

    def run(adapter_class: type) -> list[torch.Tensor] | None:
        try:
            with async_accelerator():
                return two_fetches_and_steps(adapter_class)
        except AsyncHazard:
            return None

    expected = run(adapter_module.SparseKeyExpertAdapter)
    assert expected is not None, "the real code must pass"
    broken = mutated(module_name, line)
    if module_name == "adapter":
        got = run(broken.SparseKeyExpertAdapter)
    else:
        owner = {"transfer": adapter_module, "pinned": sys.modules["meft_ds.transfer"]}[module_name]
        name = {"transfer": "RowTransfer", "pinned": "PinnedBuffers"}[module_name]
        monkeypatch.setattr(owner, name, getattr(broken, name))
        got = run(adapter_module.SparseKeyExpertAdapter)
    assert got is None or any(not torch.equal(a, b) for a, b in zip(expected, got, strict=True)), (
        f"deleting `{line.split(chr(10))[0]}` went unnoticed"
    )


def test_the_harness_itself_flags_each_hazard() -> None:
    with async_accelerator() as harness:
        side = harness.Stream()
        pinned = harness.pinned_copy(torch.arange(4.0))
        on_device = torch.empty(4)
        with harness.stream(side), pytest.raises(AsyncHazard, match="allocated on"):
            on_device.copy_(pinned, non_blocking=True)
        with harness.stream(side):
            target = torch.empty(4)
            target.copy_(pinned, non_blocking=True)
        assert torch.isnan(harness.peek(target)).all(), "poison until waited for"
        with pytest.raises(AsyncHazard, match="has not waited"):
            target.sum()
        event = harness.Event()
        event.record(side)
        harness.current_stream().wait_event(event)
        with pytest.raises(AsyncHazard, match="record_stream"):
            target.sum()
        target.record_stream(harness.current_stream())
        assert torch.equal(target, torch.arange(4.0))
        with pytest.raises(AsyncHazard, match="rewritten"):
            pinned.add_(1)
        event.synchronize()
        pinned.add_(1)  # complete: the buffer is free again
        host = harness.pinned_copy(torch.zeros(4))
        host.copy_(target, non_blocking=True)
        assert torch.isnan(harness.peek(host)).all()
        with pytest.raises(AsyncHazard, match="has not completed"):
            host.sum()
        harness.synchronize()
        assert torch.equal(host, torch.arange(4.0))


def test_the_harness_flags_pinned_memory_freed_while_a_copy_into_it_is_pending() -> None:
    # DeepSpeed's native pinning frees a buffer's memory when the tensor is collected: a device->host copy still
    # pending writes into freed memory (the harness kept every copy's destination alive, so it could not see this)
    with pytest.raises(AsyncHazard, match="freed while a non_blocking copy"), async_accelerator() as harness:
        host = harness.pinned_copy(torch.zeros(4))
        host.copy_(torch.arange(4.0), non_blocking=True)
        del host


def test_the_harness_flags_a_tensor_rewritten_while_a_copy_on_another_stream_reads_it() -> None:
    # a copy on a side stream reads its source when that stream gets to it: the compute stream may not write the
    # source before it has waited for the copy (the harness read the source when the copy was issued)
    with async_accelerator() as harness:
        side = harness.Stream()
        grads = torch.arange(4.0)
        host = harness.pinned_copy(torch.zeros(4))
        produced = harness.Event()
        produced.record()
        with harness.stream(side):
            side.wait_event(produced)
            grads.record_stream(side)
            host.copy_(grads, non_blocking=True)
        copied = harness.Event()
        copied.record(side)
        with pytest.raises(AsyncHazard, match="still reads"):
            grads.zero_()
        harness.current_stream().wait_event(copied)
        grads.zero_()  # ordered after the copy now
        copied.synchronize()
        assert torch.equal(host, torch.arange(4.0))


def test_the_harness_compares_what_a_copy_read_bit_for_bit() -> None:
    # a staged NaN (a diverged row) is not a rewritten buffer: NaN != NaN made the harness report one
    with async_accelerator() as harness:
        side = harness.Stream()
        staging = harness.pinned_copy(torch.tensor([1.0, float("nan")]))
        with harness.stream(side):
            rows = torch.empty(2)
            rows.copy_(staging, non_blocking=True)
        copied = harness.Event()
        copied.record(side)
        copied.synchronize()
