"""inject(): every supported family (each built tiny from its own config class), base logits unchanged, training moves
only the adapters."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from tiny_models import VOCAB, tiny_config, tiny_model, token_batch, train_losses
from torch import nn
from transformers import Llama4ForConditionalGeneration, PretrainedConfig

import meft_ds
from meft_ds import MeftConfig, MeftConfigError, SparseRowAdam, UnsupportedModelError
from meft_ds.baselines import ffn_lora_targets
from meft_ds.inject import locate_ffns

FAMILIES = meft_ds.supported_model_types()  # each built tiny from its own config class (tiny_models.tiny_config)
CONFIG = MeftConfig(num_neurons=256, top_k=8)


@pytest.mark.parametrize("family", FAMILIES)
def test_injected_model_gives_base_logits_then_trains(family: str) -> None:
    model = tiny_model(family)
    batch = token_batch()
    with torch.no_grad():
        base_logits = model(batch).logits
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}
    lora = ffn_lora_targets(model)  # --method lora adapts the FFNs MEFT sits beside: linear layers, MoE experts
    targets, ffn = lora.modules + lora.parameters, f".{locate_ffns(model).ffn_attr}."
    assert len(targets) >= 2 * 2 and all(ffn in name for name in targets), targets

    assert meft_ds.inject(model, CONFIG) is model
    adapters = meft_ds.adapters(model)
    assert [a.layer_index for a in adapters] == [0, 1]
    assert all(isinstance(a.router, nn.Linear) and a.router.out_features == CONFIG.num_experts for a in adapters)
    assert adapters[0].store.keys.shape == (256, 64) and adapters[0].store.keys.dtype == torch.float32
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(name.startswith("meft_adapters.") for name in trainable)
    with torch.no_grad():
        assert torch.equal(model(batch).logits, base_logits), "V = 0: the injected model is the base model"

    sparse = SparseRowAdam(adapters, lr=1e-2)
    dense = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    values_before = adapters[0].store.values.clone()
    losses = train_losses(model, [sparse, dense], batch)
    assert losses[-1] < losses[0]
    assert not torch.equal(adapters[0].store.values, values_before)
    for name, weight in model.state_dict().items():
        if not name.startswith("meft_adapters."):
            assert torch.equal(weight, base_weights[name]), f"frozen base weight {name} changed"
    assert set(base_weights) == {k for k in model.state_dict() if not k.startswith("meft_adapters.")}


def test_only_chosen_layers_get_adapters() -> None:
    model = meft_ds.inject(tiny_model(layers=3), {"num_neurons": 64, "top_k": 4, "layers": [0, -1]})
    assert [a.layer_index for a in meft_ds.adapters(model)] == [0, 2]
    assert list(model.meft_adapters.keys()) == ["0", "2"]


def test_injecting_twice_is_an_error() -> None:
    model = meft_ds.inject(tiny_model(), CONFIG)
    with pytest.raises(meft_ds.MeftConfigError, match="already has meft adapters"):
        meft_ds.inject(model, CONFIG)


class ToyConfig(PretrainedConfig):
    model_type = "toy_lm"

    def __init__(self, hidden_size: int = 32, **kwargs) -> None:
        super().__init__(**kwargs)
        self.hidden_size = hidden_size


class ToyBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.feed_forward = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.feed_forward(x)


class ToyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = ToyConfig()
        self.embed = nn.Embedding(VOCAB, 32)
        self.blocks = nn.ModuleList([ToyBlock(32), ToyBlock(32)])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return x


def test_unknown_architecture_lists_supported_ones_and_how_to_register() -> None:
    with pytest.raises(UnsupportedModelError) as error:
        meft_ds.inject(ToyLM(), CONFIG)
    message = str(error.value)
    assert "'toy_lm'" in message and "llama" in message and "gpt2" in message
    assert "meft_ds.register_ffn(" in message


def test_register_ffn_extends_the_registry() -> None:
    meft_ds.register_ffn("toy_lm", "blocks", "feed_forward")
    model = ToyLM()
    ids = token_batch()
    before = model(ids)
    meft_ds.inject(model, {"num_neurons": 64, "top_k": 4})
    assert len(meft_ds.adapters(model)) == 2
    assert torch.equal(model(ids), before)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_bare_base_model_takes_adapters_that_load_into_its_causal_lm(family: str, tmp_path) -> None:
    """``AutoModel``'s bare base model (``LlamaModel``: no head, as embedding and reward models fine-tune it) has its
    decoder layers at the top (``layers``, not ``model.layers``): inject failed ("LlamaModel has no nn.ModuleList at
    'model.layers'"). Its export loads into the causal LM of the same weights, which then computes the same."""
    bare = own_base_model(tiny_model(family))
    assert bare is not tiny_model(family) and not hasattr(bare, "lm_head")
    meft_ds.inject(bare, CONFIG)
    assert [a.layer_index for a in meft_ds.adapters(bare)] == [0, 1]
    for adapter in meft_ds.adapters(bare):
        adapter.store.values.normal_(0, 0.1, generator=torch.Generator().manual_seed(adapter.layer_index))
    meft_ds.save_adapter(bare, tmp_path)
    causal_lm = meft_ds.load_adapter(tiny_model(family), tmp_path)
    batch = token_batch()
    with torch.no_grad():
        expected = bare(batch).last_hidden_state
        assert not torch.equal(expected, own_base_model(tiny_model(family))(batch).last_hidden_state), "adapters count"
        assert torch.equal(own_base_model(causal_lm)(batch).last_hidden_state, expected)


def own_base_model(causal_lm: torch.nn.Module) -> torch.nn.Module:
    """The causal LM's own base model, weights and all: ``base_model``, or Llama 4's ``model`` (its base_model_prefix
    names the language model of the multimodal checkpoints, so its ``base_model`` is the causal LM itself)."""
    base = causal_lm.base_model
    return causal_lm.model if base is causal_lm else base


def test_wrong_registered_path_is_a_clear_error() -> None:
    meft_ds.register_ffn("toy_lm", "layers", "feed_forward")
    with pytest.raises(UnsupportedModelError, match=r"no nn\.ModuleList at 'layers'"):
        meft_ds.inject(ToyLM(), CONFIG)
    meft_ds.register_ffn("toy_lm", "blocks", "mlp")
    with pytest.raises(UnsupportedModelError, match="no FFN module 'mlp'"):
        meft_ds.inject(ToyLM(), CONFIG)


def test_activation_checkpointing_gives_the_same_gradients_fetching_rows_twice() -> None:
    # what launch/plan.py proposes when a run does not fit: the recomputed forward routes and fetches again
    results = []
    for checkpointing in (False, True):
        model = tiny_model(layers=2).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        meft_ds.inject(model, MeftConfig(num_neurons=128, top_k=8, seed=1))
        for adapter in meft_ds.adapters(model):
            adapter.store.values.normal_(0, 0.1, generator=torch.Generator().manual_seed(adapter.layer_index))
        batch = token_batch(batch=2, length=12)
        model(batch, labels=batch).loss.backward()
        layers = []
        for adapter in meft_ds.adapters(model):
            adapter.collect_row_grads()
            ids, grads = adapter.store.accumulated_grads()
            layers.append((ids, grads, adapter.router.weight.grad, adapter.traffic.rows_fetched))
        results.append(layers)
    for (ids, grads, router, fetched), (ids_c, grads_c, router_c, fetched_c) in zip(*results, strict=True):
        assert torch.equal(ids, ids_c) and torch.equal(grads, grads_c) and torch.equal(router, router_c)
        assert fetched_c == 2 * fetched


def test_pre_retrieval_under_activation_checkpointing_is_one_clear_error() -> None:
    # the recomputed forward cannot choose the pre-retrieved rows again (torch would fail on the rows' shapes, or
    # train on other rows where the shapes happen to agree); also when checkpointing is enabled after inject
    model = meft_ds.inject(tiny_model(layers=2).train(), MeftConfig(num_neurons=128, top_k=8, prefetch_layers=1))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = token_batch(batch=2, length=12)
    with pytest.raises(MeftConfigError, match=r"^meft\.prefetch_layers: 1 pre-retrieves .* Fix: set prefetch_layers=0"):
        model(batch, labels=batch)
    with torch.no_grad():  # no backward, nothing recomputed: generation from a checkpointed model is unaffected
        model(batch)


def test_an_in_memory_store_gathers_the_rows_after_the_ffn(monkeypatch: pytest.MonkeyPatch) -> None:
    """An in-memory store reads nothing in the background (test_nvme's counterpart starts its reads before the FFN):
    its rows are gathered after the FFN ran, just before the kernel reads them, so that they are still in cache."""
    model = meft_ds.inject(tiny_model(), CONFIG)
    events: list[tuple[str, int]] = []
    gather_into = meft_ds.store.CpuRowStore.gather_into

    def recorded(store: meft_ds.store.CpuRowStore, *args: object) -> None:
        events.append(("gather", stores.index(store)))
        gather_into(store, *args)

    stores = [adapter.store for adapter in meft_ds.adapters(model)]
    monkeypatch.setattr(meft_ds.store.CpuRowStore, "gather_into", recorded)
    for index, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_hook(lambda *_, i=index: events.append(("ffn", i)), prepend=True)  # before finish
    with torch.no_grad():
        model(token_batch())
    assert events == [("ffn", 0), ("gather", 0), ("ffn", 1), ("gather", 1)]


@pytest.mark.parametrize(
    ("overrides", "known"),
    [({}, [True, True]), ({"prefetch_layers": 1}, [True, False]), ({"row_dtype": "bf16"}, [False, False])],
    ids=["fp32 rows", "pre-retrieval", "bf16 rows"],
)
def test_the_kernel_takes_routings_scores_where_they_are_its_own(
    overrides: dict, known: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Routing scores each pick against the fp32 master keys; the forward kernel takes those scores where it would
    compute the same bits (its own hidden states, rows in fp32), and a step ends where computing them does."""

    def trained(reuse: bool) -> tuple[list[bool], list[torch.Tensor]]:
        passed: list[bool] = []
        apply = meft_ds.adapter.TopKAdapterFunction.apply

        def recorded(*args: object) -> torch.Tensor:
            passed.append(args[-1] is not None)
            return apply(*args[:-1], args[-1] if reuse else None)

        monkeypatch.setattr(meft_ds.adapter.TopKAdapterFunction, "apply", recorded)
        model = meft_ds.inject(tiny_model(), MeftConfig(num_neurons=256, top_k=8, **overrides))
        adapters = meft_ds.adapters(model)
        optimizer = SparseRowAdam(adapters, lr=1e-2)
        for step in range(2):  # values are zero until the first step: the second one's output uses them
            batch = token_batch(seed=step)
            model(batch, labels=batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return passed, [adapter.store.rows.clone() for adapter in adapters]

    passed, reused = trained(reuse=True)
    assert passed[:2] == known
    _, computed = trained(reuse=False)
    assert all(torch.equal(a, b) for a, b in zip(reused, computed, strict=True))
    assert not torch.equal(computed[0], meft_ds.inject(tiny_model(), CONFIG).meft_adapters["0"].store.rows)


class Int8Linear(nn.Module):
    """A quantized linear layer, as bitsandbytes' ``Linear4bit`` is to the FFN: integer weights (a parameter that
    needs no gradient) and a scale, computing in its input's dtype."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        scale = linear.weight.detach().abs().amax() / 127
        self.weight = nn.Parameter(torch.round(linear.weight.detach() / scale).to(torch.int8), requires_grad=False)
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ (self.weight.to(x.dtype) * self.scale.to(x.dtype)).T


def test_a_quantized_ffn_gets_adapters_in_its_layers_dtype() -> None:
    """A 4-bit base (bitsandbytes, QLoRA-style) has integer FFN weights: the router was made in their dtype and
    failed ("Only Tensors of floating point and complex dtype can require gradients"). It computes in the dtype of
    the layer, whose norms hold the hidden states' dtype."""
    model = tiny_model().to(torch.bfloat16)
    for layer in model.model.layers:
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(layer.mlp, name, Int8Linear(getattr(layer.mlp, name)))
    quantized = {k: v.clone() for k, v in model.state_dict().items() if v.dtype == torch.int8}
    meft_ds.inject(model, CONFIG)
    adapters = meft_ds.adapters(model)
    assert [a.router.weight.dtype for a in adapters] == [torch.bfloat16] * 2
    losses = train_losses(model, [SparseRowAdam(adapters, lr=1e-2)], token_batch())
    assert losses[-1] < losses[0]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in quantized.items()) and len(quantized) == 6


def test_llama4_s_model_of_images_and_text_takes_adapters_on_its_language_model() -> None:
    """A Llama 4 checkpoint (model_type llama4) loads through AutoModelForCausalLM as its text model (llama4_text: the
    families' tests); the model of images and text itself has its language model's layers at
    ``language_model.model.layers``, and takes adapters there."""
    config = tiny_config("llama4")
    assert tiny_model("llama4").config.model_type == "llama4_text"
    torch.manual_seed(0)
    model = Llama4ForConditionalGeneration(config).eval()
    batch = token_batch()
    with torch.no_grad():
        before = model(input_ids=batch).logits
        meft_ds.inject(model, CONFIG)
        assert [a.layer_index for a in meft_ds.adapters(model)] == [0, 1]
        assert torch.equal(model(input_ids=batch).logits, before), "V = 0: the injected model is the base model"
        for adapter in meft_ds.adapters(model):
            adapter.store.values.normal_(0, 0.1, generator=torch.Generator().manual_seed(adapter.layer_index))
        assert not torch.equal(model(input_ids=batch).logits, before)


def test_the_readme_names_every_supported_architecture() -> None:
    """README.md's "Supported architectures" lists each model_type of the registry (as the families' tests run them)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Supported architectures", 1)[1].split("Each is tested on a tiny", 1)[0]
    assert set(FAMILIES) <= set(re.findall(r"`([\w-]+)`", section))
