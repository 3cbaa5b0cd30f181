"""meft_ds.disable_adapters (PEFT's disable_adapter): within the block a trained model computes as its base model,
routes and fetches nothing, and gives no gradient to rows or routers; after it, the adapted model again."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import tiny_model, token_batch

import meft_ds
from meft_ds import MeftConfigError, SparseRowAdam

MEFT = {"num_neurons": 64, "top_k": 4, "seed": 3}


def trained_model(base: torch.nn.Module | None = None, **settings: object) -> torch.nn.Module:
    """``base`` (the tiny model) with adapters (``MEFT`` and ``settings``), after 3 steps of a plain loop (values no
    longer zero)."""
    model = meft_ds.inject(base or tiny_model(), {**MEFT, **settings})
    sparse = SparseRowAdam(meft_ds.adapters(model), lr=1e-2)
    dense = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for seed in range(3):
        batch = token_batch(batch=2, length=12, seed=seed)
        model(batch, labels=batch).loss.backward()
        for optimizer in (sparse, dense):
            optimizer.step()
            optimizer.zero_grad()
    return model


@pytest.mark.parametrize(
    "settings", [{}, {"prefetch_layers": 1, "cache_mb": 1}], ids=["default", "rows pre-retrieved and cached"]
)
def test_a_trained_model_computes_as_its_base_model_in_the_block_and_adapted_after(settings: dict) -> None:
    model, batch = trained_model(**settings), token_batch(batch=2, length=12, seed=9)
    base = tiny_model()(batch).logits
    adapted = model(batch).logits
    assert not torch.allclose(adapted, base, atol=1e-4), "the adapters learned something"
    fetched = meft_ds.stats(model)["rows_fetched"]
    with meft_ds.disable_adapters(model):
        assert torch.equal(model(batch).logits, base)
        assert torch.equal(model.generate(batch[:1, :4], max_new_tokens=3, do_sample=False),
                           tiny_model().generate(batch[:1, :4], max_new_tokens=3, do_sample=False))  # fmt: skip
    assert meft_ds.stats(model)["rows_fetched"] == fetched, "nothing routed or fetched in the block"
    assert torch.equal(model(batch).logits, adapted)


def test_with_lora_beside_meft_every_way_in_switches_both_off() -> None:
    """A PEFT model's own disable_adapter() (what TRL's DPO, KTO and GRPO trainers use for the reference model when
    none is given) switched LoRA off and left MEFT on, so that "reference" was the policy's MEFT part, moving as it
    trained; meft_ds.disable_adapters and MeftModel.disable_adapter did the reverse."""
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # LoRA's B not zero
    model, batch = trained_model(get_peft_model(tiny_model(), lora)), token_batch(batch=2, length=12, seed=9)
    base, adapted = tiny_model()(batch).logits, model(batch).logits
    ways_in: list[Callable] = [model.disable_adapter, lambda: meft_ds.disable_adapters(model),
                               meft_ds.MeftModel(model).disable_adapter]  # fmt: skip
    for way_in in ways_in:
        with way_in():
            assert torch.equal(model(batch).logits, base)
        assert torch.equal(model(batch).logits, adapted)


@pytest.mark.parametrize(
    "settings", [{}, {"prefetch_layers": 1, "cache_mb": 1}], ids=["default", "rows pre-retrieved and cached"]
)
def test_a_forward_in_the_block_between_a_forward_and_its_backward_leaves_the_gradients_as_they_were(
    settings: dict,
) -> None:
    """TRL's DPO runs the reference's forward (the block, without a gradient) after the policy's forward and before
    its backward."""
    batch, other = token_batch(batch=2, length=12, seed=9), token_batch(batch=2, length=12, seed=10)
    grads = []
    for reference_between in (False, True):
        model = trained_model(**settings)
        loss = model(batch, labels=batch).loss
        if reference_between:
            with torch.no_grad(), meft_ds.disable_adapters(model):
                model(other)
        loss.backward()
        for adapter in meft_ds.adapters(model):
            adapter.collect_row_grads()
        grads.append([(*a.store.accumulated_grads(), a.router.weight.grad) for a in meft_ds.adapters(model)])
    for alone, between in zip(*grads, strict=True):
        for tensor, same in zip(alone, between, strict=True):
            assert torch.equal(tensor, same)


def test_a_backward_in_the_block_gives_rows_and_routers_no_gradient() -> None:
    model, batch = trained_model(), token_batch(batch=2, length=12, seed=9)
    with meft_ds.disable_adapters(model):
        assert not model(batch, labels=batch).loss.requires_grad  # the base model is frozen: nothing to train
        model.lm_head.weight.requires_grad_(True)  # a trainable base parameter (say a head trained beside)
        model(batch, labels=batch).loss.backward()
    assert model.lm_head.weight.grad is not None
    for adapter in meft_ds.adapters(model):
        adapter.collect_row_grads()
        assert adapter.store.accumulated_grads() is None and adapter.router.weight.grad is None


def test_the_block_restores_what_was_set_before_also_nested_and_on_an_error() -> None:
    model = meft_ds.MeftModel(tiny_model(), MEFT)  # PEFT's spelling: model.disable_adapter()
    with model.disable_adapter():
        with meft_ds.disable_adapters(model):
            pass
        assert all(adapter.disabled for adapter in meft_ds.adapters(model))
    assert not any(adapter.disabled for adapter in meft_ds.adapters(model))
    with pytest.raises(KeyError), meft_ds.disable_adapters(model):
        raise KeyError("inside")
    assert not any(adapter.disabled for adapter in meft_ds.adapters(model))


def test_a_model_without_adapters_is_refused() -> None:
    refused = r"disable_adapters: LlamaForCausalLM has no meft adapters\. Fix: "
    with pytest.raises(MeftConfigError, match=refused), meft_ds.disable_adapters(tiny_model()):
        pass


def test_part_of_a_chain_of_pre_retrieving_adapters_is_refused() -> None:
    model = meft_ds.inject(tiny_model(layers=3), {**MEFT, "prefetch_layers": 1})
    refused = r"layers \[1\] pre-retrieve rows for, or from, adapters outside SparseKeyExpertAdapter"
    with pytest.raises(MeftConfigError, match=refused), meft_ds.disable_adapters(meft_ds.adapters(model)[1]):
        pass
    with meft_ds.disable_adapters(model):  # the whole chain
        assert all(adapter.disabled for adapter in meft_ds.adapters(model))
