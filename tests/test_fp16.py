"""fp16 with real DeepSpeed engines (ZeRO stage 0's FP16 optimizers, ZeRO 1-3, ``torch_autocast``'s GradScaler) on a
tiny model: the rows' gradients are unscaled exactly as the engine's, the global clip norm is the unscaled one, and
an overflow in the rows' gradients skips the whole step and lowers the loss scale, as DeepSpeed does for its own,
without counting towards SparseRowAdam's abort; in fp32 a row overflow still counts.

DeepSpeed's CPU accelerator reports fp16 support only where oneDNN has fp16 kernels; torch computes fp16 on any CPU
(a tiny model is fast either way), so these tests run on a CPU accelerator that reports it everywhere."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from deepspeed.accelerator import get_accelerator, set_accelerator
from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator
from deepspeed.runtime import torch_autocast
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.utils import safe_get_full_fp32_param
from tiny_models import SMALL_BUCKET, tiny_model, token_batch

import meft_ds
from meft_ds import NonFiniteGradientError

MEFT = {"num_neurons": 64, "top_k": 4, "seed": 3}
SCALE_POWER = 8  # initial loss scale 256: finite for a tiny model, far from 1


class FP16CPUAccelerator(CPU_Accelerator):
    """DeepSpeed's CPU accelerator, reporting fp16 support whatever oneDNN says about this CPU."""

    def is_fp16_supported(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def fp16_cpu_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    original = get_accelerator()
    set_accelerator(FP16CPUAccelerator())
    # an engine with torch_autocast sets these process-wide, and every later ZeRO engine would then scale its loss
    # with a GradScaler of its own: restore them after each test
    monkeypatch.setattr(torch_autocast, "TORCH_AUTOCAST_INITIALIZED", torch_autocast.TORCH_AUTOCAST_INITIALIZED)
    monkeypatch.setattr(torch_autocast, "TORCH_AUTOCAST_DTYPE", torch_autocast.TORCH_AUTOCAST_DTYPE)
    try:
        yield
    finally:
        set_accelerator(original)


def config(precision: str, stage: int, *, offload: bool = False, fused: bool = False, clip: float = 1e6) -> dict:
    """``clip`` defaults to a bound no gradient reaches: the plugin then computes the global norm, clipping nothing."""
    zero = {"stage": stage, "reduce_bucket_size": SMALL_BUCKET}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
    result = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_clipping": clip,
        # torch's AdamW (ZeRO stage 0: FP16_UnfusedOptimizer) unless fused (FusedAdam: FP16_Optimizer)
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": not fused and not offload}},
        "zero_optimization": zero,
        "meft": {**MEFT, "max_nonfinite_steps": 2},
    }
    if precision == "fp16":  # hysteresis 1: ZeRO's scaler lowers the scale at the first overflow, as stage 0's does
        result["fp16"] = {"enabled": True, "initial_scale_power": SCALE_POWER, "hysteresis": 1}
    elif precision == "autocast_fp16":
        result["torch_autocast"] = {"enabled": True, "dtype": "torch.float16"}
    return result


def reference_row_grads(batch: torch.Tensor) -> tuple[float, float]:
    """fp32, plain torch: the norm of all rows' gradients and the global norm (rows and routers) of one batch."""
    model = meft_ds.inject(tiny_model(), MEFT)
    model(batch, labels=batch).loss.backward()
    rows = 0.0
    for adapter in meft_ds.adapters(model):
        adapter.collect_row_grads()
        rows += float(adapter.store.accumulated_grads()[1].double().pow(2).sum())
    routers = sum(float(p.grad.double().pow(2).sum()) for p in model.parameters() if p.grad is not None)
    return math.sqrt(rows), math.sqrt(rows + routers)


def row_grad_norm_at_the_sparse_step(engine) -> list[float]:
    """Records the norm of the rows' gradients as the sparse Adam receives them (after unscaling)."""
    seen = []
    sparse = engine.meft.sparse_optimizer
    original = sparse.step

    def step(*args, **kwargs):
        squared = sum(float(g.double().pow(2).sum()) for _, g in sparse._accumulated())
        seen.append(math.sqrt(squared))
        return original(*args, **kwargs)

    sparse.step = step
    return seen


@pytest.mark.parametrize(
    ("precision", "stage", "backward"),
    [
        ("fp16", 0, "engine.backward"),
        ("fp16", 2, "engine.backward"),
        ("autocast_fp16", 0, "engine.backward"),
        ("autocast_fp16", 2, "engine.backward"),
        ("fp16", 2, "engine.scale"),  # DeepSpeed refuses a caller's backward at stage 0
        ("autocast_fp16", 2, "engine.scale"),
    ],
)
def test_row_gradients_and_clip_norm_are_unscaled_like_the_engines(precision: str, stage: int, backward: str) -> None:
    """Whether the engine backpropagates the loss or the caller does, with ``engine.scale(loss).backward()``."""
    batch = token_batch(batch=2, length=12, seed=10)
    engine, *_ = meft_ds.initialize(model=tiny_model(), config=config(precision, stage))
    seen = row_grad_norm_at_the_sparse_step(engine)
    loss = engine(batch, labels=batch).loss
    if backward == "engine.scale":
        engine.scale(loss).backward()
    else:
        engine.backward(loss)
    engine.step()
    assert engine.was_step_applied()
    rows, total = reference_row_grads(batch)
    # fp16 rounds to 2^-11 relative; a scale left in (256 or 65536) or divided twice would be off by orders of magnitude
    assert seen == [pytest.approx(rows, rel=2e-2)]
    plugin = engine.meft
    assert plugin.last_grad_norm == pytest.approx(total, rel=2e-2)
    if precision == "fp16" and stage > 0:
        assert plugin.last_loss_scale == engine.optimizer.loss_scale == 2**SCALE_POWER
    elif precision == "fp16":  # DeepSpeed 0.19's engine.backward leaves the loss unscaled at stage 0 (PR #8393)
        assert plugin.last_loss_scale in (1.0, engine.optimizer.loss_scale)
    else:  # torch.amp.GradScaler's default initial scale
        assert plugin.last_loss_scale == 2.0**16


def test_rows_are_unscaled_when_stage_0_applies_the_loss_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    """DeepSpeed's pending fix (PR #8393; DeepSpeed <= 0.17 did it too) scales the loss by the FP16 optimizer's scale
    at ZeRO stage 0, whose optimizer has no ``cur_scale`` attribute in DeepSpeed 0.19: the rows must follow whatever
    the engine applies."""
    unscaled_backward = DeepSpeedEngine.backward

    def backward_with_pr_8393(engine, loss, *args, **kwargs):
        if engine.fp16_enabled() and not engine.zero_optimization():
            loss = loss * engine.optimizer.loss_scale
        return unscaled_backward(engine, loss, *args, **kwargs)

    monkeypatch.setattr(DeepSpeedEngine, "backward", backward_with_pr_8393)
    batch = token_batch(batch=2, length=12, seed=10)
    engine, *_ = meft_ds.initialize(model=tiny_model(), config=config("fp16", 0))
    assert not hasattr(engine.optimizer, "cur_scale")
    seen = row_grad_norm_at_the_sparse_step(engine)
    engine.backward(engine(batch, labels=batch).loss)
    engine.step()
    assert seen == [pytest.approx(reference_row_grads(batch)[0], rel=2e-2)]
    assert engine.meft.last_loss_scale == 2**SCALE_POWER


def router_master(engine) -> torch.Tensor:
    weight = meft_ds.adapters(engine.module)[0].router.weight
    master = safe_get_full_fp32_param(weight)  # None at ZeRO stage 0, whose module holds the weights themselves
    return (weight.detach().float() if master is None else master).clone()


@pytest.mark.parametrize(
    ("stage", "offload", "fused"),
    [(0, False, False), (0, False, True), (2, True, False), (3, False, False), (3, True, False)],
    ids=["stage0-unfused", "stage0-fused", "stage2-offload", "stage3", "stage3-offload"],
)
def test_row_overflow_skips_the_step_and_lowers_the_loss_scale(stage: int, offload: bool, fused: bool) -> None:
    model = tiny_model()
    engine, *_ = meft_ds.initialize(model=model, config=config("fp16", stage, offload=offload, fused=fused, clip=1.0))
    adapters = meft_ds.adapters(model)
    batch = token_batch(batch=2, length=12, seed=10)
    for _ in range(3):  # one more than max_nonfinite_steps: these are overflows, not a diverged run
        rows, router, scale = adapters[0].store.rows.clone(), router_master(engine), engine.optimizer.loss_scale
        engine.backward(engine(batch, labels=batch).loss)
        adapters[0].collect_row_grads()
        adapters[0].store.accumulated_grads()[1][0, 0, 0] = float("inf")
        engine.step()
        assert not engine.was_step_applied()
        assert engine.optimizer.loss_scale == scale / 2
        assert torch.equal(adapters[0].store.rows, rows) and torch.equal(router_master(engine), router)
        assert all(adapter.store.accumulated_grads() is None for adapter in adapters)
    plugin = engine.meft
    assert plugin.row_overflow_steps == plugin.skipped_steps == 3
    assert plugin.sparse_optimizer.nonfinite_steps == 0 and plugin.sparse_optimizer.global_step == 0
    # and the next step, without overflow, trains rows and routers
    rows, router = adapters[0].store.rows.clone(), router_master(engine)
    engine.backward(engine(batch, labels=batch).loss)
    engine.step()
    assert engine.was_step_applied() and plugin.sparse_optimizer.global_step == 1
    assert not torch.equal(adapters[0].store.rows, rows)


def test_an_engine_that_cannot_be_told_of_the_rows_overflow_steps_and_only_the_rows_skip(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An fp16 optimizer without any of the overflow checks the plugin answers (another DeepSpeed's) steps the
    routers anyway (unclipped here: a global norm over infinite rows would zero their gradients): the rows skip their
    step (counted as a non-finite step, not as a skipped one) and a warning says so."""
    from meft_ds import plugin as plugin_module

    monkeypatch.setattr(plugin_module, "OVERFLOW_CHECKS", ())
    model = tiny_model()
    engine, *_ = meft_ds.initialize(model=model, config=config("fp16", 0, clip=0.0))
    adapter = meft_ds.adapters(model)[0]
    batch = token_batch(batch=2, length=12, seed=10)
    engine.backward(engine(batch, labels=batch).loss)
    engine.step()  # the values leave zero: from now on the routers have gradients
    rows, router = adapter.store.rows.clone(), router_master(engine)
    engine.backward(engine(batch, labels=batch).loss)
    adapter.collect_row_grads()
    adapter.store.accumulated_grads()[1][0, 0, 0] = float("inf")
    with caplog.at_level(logging.WARNING, logger="meft_ds"):
        engine.step()
    assert engine.was_step_applied() and not torch.equal(router_master(engine), router)
    assert torch.equal(adapter.store.rows, rows)
    plugin = engine.meft
    assert plugin.skipped_steps == plugin.row_overflow_steps == 0 and plugin.sparse_optimizer.nonfinite_steps == 1
    assert [r.getMessage() for r in caplog.records if r.name == "meft_ds"] == [
        "meft_ds: the engine stepped despite the rows' fp16 overflow; only the row step is skipped.",
        "meft_ds: NaN or inf in the row gradients; the row step is skipped (1 in a row, 1 in total).",
    ]


def test_in_fp32_a_row_overflow_still_counts_towards_the_abort() -> None:
    model = tiny_model()
    engine, *_ = meft_ds.initialize(model=model, config=config("fp32", 2, offload=True))
    adapter = meft_ds.adapters(model)[0]
    batch = token_batch(batch=2, length=12, seed=10)
    for step in range(2):
        engine.backward(engine(batch, labels=batch).loss)
        adapter.collect_row_grads()
        adapter.store.accumulated_grads()[1][0, 0, 0] = float("nan")
        if step == 0:
            engine.step()
            assert engine.was_step_applied() and engine.meft.sparse_optimizer.nonfinite_steps == 1
    with pytest.raises(NonFiniteGradientError, match="2 optimizer steps in a row"):
        engine.step()
