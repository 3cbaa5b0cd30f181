"""Exported adapters in PEFT's layout (meft_ds.export): files and names, round trips through save_adapter /
load_adapter and MeftModel, sharded weights, meft_ds 0.1's format, refusals, and saves that fail half-way."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import tiny_model, token_batch
from transformers import AutoModelForCausalLM, LlamaConfig

import meft_ds
import meft_ds.export
from meft_ds import CheckpointError, MeftModel, adapters

MEFT = {"num_neurons": 64, "top_k": 4, "seed": 3}
NAMES = {
    f"base_model.model.model.layers.{i}.mlp.meft_adapter.{part}"
    for i in (0, 1)
    for part in ("keys", "values", "router.weight")
}


def adapted(meft: dict | None = None, **model_kwargs: int) -> torch.nn.Module:
    """A tiny LLaMA with adapters whose values and routers are not at their initial values (as after training)."""
    model = meft_ds.inject(tiny_model(**model_kwargs), meft or MEFT)
    generator = torch.Generator().manual_seed(5)
    for adapter in adapters(model):
        adapter.store.values.normal_(0.0, 0.05, generator=generator)
        with torch.no_grad():
            adapter.router.weight.add_(torch.randn(adapter.router.weight.shape, generator=generator))
        adapter.rows_changed()
    return model


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(token_batch(batch=2, length=10, seed=99)).logits


@pytest.fixture(scope="module")
def trained() -> tuple[torch.nn.Module, torch.Tensor]:
    model = adapted()
    reference = logits(model)
    assert not torch.equal(reference, logits(tiny_model())), "the adapter must change the model"
    return model, reference


def test_peft_layout_names_config_and_round_trip(tmp_path: Path, trained: tuple) -> None:
    model, reference = trained
    meft_ds.save_adapter(model, tmp_path, base_model_name_or_path="my-org/tiny-llama")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "MEFT" and config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == "my-org/tiny-llama"
    assert config["meft_ds_version"] == importlib.metadata.version("meft_ds")
    assert config["format_version"] == meft_ds.export.FORMAT_VERSION == 2
    assert config["target_modules"] == ["model.layers.0.mlp", "model.layers.1.mlp"] and config["layers"] == [0, 1]
    assert (config["model_type"], config["hidden_size"], config["num_hidden_layers"]) == ("llama", 64, 2)
    assert {k: config[k] for k in MEFT} == MEFT and config["num_experts"] == adapters(model)[0].config.num_experts
    assert "store" not in config, "where the rows lived in training is no business of the export"
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as weights:
        assert set(weights.keys()) == NAMES
        assert weights.metadata()["export_id"] == config["export_id"]
        keys = weights.get_tensor("base_model.model.model.layers.1.mlp.meft_adapter.keys")
    assert keys.dtype == torch.float32 and torch.equal(keys, adapters(model)[1].store.keys)
    fresh = meft_ds.load_adapter(tiny_model(), tmp_path)
    assert torch.equal(logits(fresh), reference)


def test_meft_model_from_pretrained_and_save_pretrained(tmp_path: Path, trained: tuple) -> None:
    model, reference = trained
    MeftModel(model).save_pretrained(tmp_path / "a")
    loaded = MeftModel.from_pretrained(tiny_model(), tmp_path / "a")
    assert torch.equal(logits(loaded), reference)
    assert loaded.config.model_type == "llama" and len(adapters(loaded)) == 2  # the base model's, through
    prompt = token_batch(batch=1, length=5, seed=7)
    assert torch.equal(loaded.generate(prompt, max_new_tokens=4, do_sample=False),
                       model.generate(prompt, max_new_tokens=4, do_sample=False))  # fmt: skip
    loaded.save_pretrained(tmp_path / "b")
    assert torch.equal(logits(meft_ds.load_adapter(tiny_model(), tmp_path / "b")), reference)
    assert torch.equal(logits(loaded.get_base_model()), reference)
    with pytest.raises(meft_ds.MeftConfigError, match=r"^merge_and_unload: .* Fix: serve the MeftModel as it is"):
        loaded.merge_and_unload()  # (was: "LlamaForCausalLM has no attribute 'merge_and_unload'")
    wrapped = MeftModel(tiny_model(), {**MEFT, "layers": [1]})  # PEFT's get_peft_model: injects
    assert [a.layer_index for a in adapters(wrapped.get_base_model())] == [1]


def test_meft_model_counts_trainable_values_as_peft_does(capsys: pytest.CaptureFixture[str]) -> None:
    """The rows (64 neurons x key and value x d = 64, in the row store, not in parameters) and the router, of the
    frozen base model's values and those."""
    wrapped = MeftModel(tiny_model(), {**MEFT, "layers": [1]})
    (router,) = [p for p in wrapped.parameters() if p.requires_grad]
    base = sum(p.numel() for p in tiny_model().parameters())
    trainable = 64 * 2 * 64 + router.numel()
    assert wrapped.get_nb_trainable_parameters() == (trainable, base + trainable)
    wrapped.print_trainable_parameters()
    share = f"{100 * trainable / (base + trainable):.4f}"
    assert capsys.readouterr().out == (
        f"trainable params: {trainable:,d} || all params: {base + trainable:,d} || trainable%: {share}\n"
    )


def test_the_adapted_model_s_own_save_pretrained_writes_the_adapter(tmp_path: Path, trained: tuple) -> None:
    """transformers' save_pretrained would write the base model and the routers without the rows (not parameters):
    on a model with adapters it writes the adapter, as PEFT's and MeftModel's do, taking transformers' arguments."""
    model, reference = trained
    model.save_pretrained(tmp_path / "a", is_main_process=True, safe_serialization=True, max_shard_size="20KB")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names[0] == "adapter_config.json" and "adapter_model.safetensors.index.json" in names  # sharded
    assert not any(name.startswith("model") for name in names), "no base-model weights"
    assert torch.equal(logits(MeftModel.from_pretrained(tiny_model(), tmp_path / "a")), reference)
    model.save_pretrained(tmp_path / "b", is_main_process=False)  # another rank's call: gathers, writes nothing
    assert not (tmp_path / "b").exists()
    type(model).save_pretrained(model, tmp_path / "c")  # transformers' own, asked for by name: the base model
    assert (tmp_path / "c" / "model.safetensors").is_file() and not (tmp_path / "c" / "adapter_config.json").exists()
    with pytest.raises(meft_ds.MeftConfigError, match=r"push_to_hub=True.*Fix: save it, then upload"):
        model.save_pretrained(tmp_path / "d", push_to_hub=True)
    assert not (tmp_path / "d").exists()


def test_sharded_export_splits_past_the_limit_and_reloads_identically(tmp_path: Path, trained: tuple) -> None:
    model, reference = trained
    (tmp_path / "trainer_state.json").write_text("{}")  # what else lives in the folder stays
    limit = 40_000  # keys and values 16 KiB each, routers 8 KiB: [k0 v0] [r0 k1] [v1 r1]
    meft_ds.save_adapter(model, tmp_path, max_shard_size=limit)
    index = json.loads((tmp_path / "adapter_model.safetensors.index.json").read_text())
    files = sorted(p.name for p in tmp_path.glob("adapter_model-*.safetensors"))
    assert files == [f"adapter_model-{i:05d}-of-00003.safetensors" for i in range(1, 4)]
    assert set(index["weight_map"]) == NAMES and sorted(set(index["weight_map"].values())) == files
    assert index["metadata"]["total_size"] == 2 * (2 * 64 * 64 + 32 * 64) * 4
    assert all((tmp_path / file).stat().st_size <= limit for file in files)
    assert torch.equal(logits(meft_ds.load_adapter(tiny_model(), tmp_path)), reference)
    # exported again in one file into the same folder: the shards and the index go, nothing else does
    meft_ds.save_adapter(model, tmp_path, max_shard_size="5GB")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "trainer_state.json"
    ]  # fmt: skip
    assert torch.equal(logits(meft_ds.load_adapter(tiny_model(), tmp_path)), reference)


class Wrapper(torch.nn.Module):
    """Holds the model as ``module``, as a DeepSpeed engine and DDP do."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module


def test_save_and_load_see_through_an_engine_and_a_meft_model(tmp_path: Path, trained: tuple) -> None:
    model, reference = trained
    meft_ds.save_adapter(Wrapper(MeftModel(model)), tmp_path)
    target = Wrapper(MeftModel(tiny_model(), MEFT))
    assert meft_ds.load_adapter(target, tmp_path) is target
    assert torch.equal(logits(target.module.base_model), reference)


def write_format_1(model: torch.nn.Module, directory: Path) -> None:
    """What meft_ds 0.1's save_adapter wrote: adapter.safetensors (``layers.<i>.{keys,values,router}``) and its
    adapter_config.json (format_version 1, the meft settings under "meft")."""
    tensors = {}
    for adapter in adapters(model):
        tensors[f"layers.{adapter.layer_index}.keys"] = adapter.store.keys.contiguous()
        tensors[f"layers.{adapter.layer_index}.values"] = adapter.store.values.contiguous()
        tensors[f"layers.{adapter.layer_index}.router"] = adapter.router.weight.detach().float().contiguous()
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter.safetensors"))
    layers = [a.layer_index for a in adapters(model)]
    meta = {
        "format_version": 1,
        "model_type": "llama",
        "hidden_size": 64,
        "layers": layers,
        "meft": {**adapters(model)[0].config.to_dict(), "layers": layers},
    }
    (directory / "adapter_config.json").write_text(json.dumps(meta, indent=2))


def test_an_export_of_meft_ds_0_1_still_loads(tmp_path: Path, trained: tuple) -> None:
    model, reference = trained
    write_format_1(model, tmp_path)
    assert torch.equal(logits(meft_ds.load_adapter(tiny_model(), tmp_path)), reference)
    assert torch.equal(logits(MeftModel.from_pretrained(tiny_model(), tmp_path)), reference)
    with pytest.raises(CheckpointError, match=r"hidden size 64 \(llama\), this model has 32"):
        meft_ds.load_adapter(narrow_llama(), tmp_path)
    # re-exported in place: the new format replaces the old files
    meft_ds.load_adapter(tiny_model(), tmp_path)
    meft_ds.save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def narrow_llama() -> torch.nn.Module:
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000, max_position_embeddings=128)  # fmt: skip
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (lambda: tiny_model("gpt2"), r"trained on a 'llama' model \(my-org/tiny-llama\), this model is 'gpt2'"),
        (narrow_llama, r"trained for hidden size 64 \(llama\), this model has 32 \(llama\)"),
        (lambda: tiny_model(layers=3), r"trained on a model with 2 decoder layers \(my-org/tiny-llama\), this .* 3"),
        (lambda: meft_ds.inject(tiny_model(), {**MEFT, "top_k": 2}), r"meft.top_k is 4 in the adapter, 2 in this"),
        (lambda: meft_ds.inject(tiny_model(), {**MEFT, "layers": [0]}), r"covers layers \[0, 1\], .* sit on \[0\]"),
    ],
    ids=["architecture", "hidden-size", "depth", "settings", "layers"],
)
def test_a_mismatched_model_is_refused_before_anything_changes(
    tmp_path: Path, trained: tuple, target: object, message: str
) -> None:
    meft_ds.save_adapter(trained[0], tmp_path, base_model_name_or_path="my-org/tiny-llama")
    model = target()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    rows_before = [a.store.rows.clone() for a in adapters(model)]
    with pytest.raises(CheckpointError, match=message):
        meft_ds.load_adapter(model, tmp_path)
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    assert all(torch.equal(a.store.rows, rows) for a, rows in zip(adapters(model), rows_before, strict=True))


def test_loading_into_another_base_of_the_same_shape_warns_but_not_into_the_built_in_model_s_cache(
    tmp_path: Path, trained: tuple, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """launch/train.py records the built-in model by its name; loaded, it is a folder of meft_ds's cache: the same
    model, so `launch/evaluate.py --adapter` of a default run says nothing (it used to warn of another base)."""
    from meft_ds.models import BUILTIN_MODEL

    monkeypatch.setenv("MEFT_DS_CACHE", str(tmp_path / "cache"))
    for recorded, loaded, warned in [
        (BUILTIN_MODEL, str(tmp_path / "cache" / f"{BUILTIN_MODEL}-98362432-v2"), False),
        ("my-org/tiny-llama", "my-org/tiny-llama", False),
        ("my-org/tiny-llama", "your-org/tiny-llama", True),
        (BUILTIN_MODEL, str(tmp_path / "elsewhere" / BUILTIN_MODEL), True),
    ]:
        meft_ds.save_adapter(trained[0], tmp_path / "export", base_model_name_or_path=recorded)
        model = tiny_model()
        model.config._name_or_path = loaded
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="meft_ds"):
            meft_ds.load_adapter(model, tmp_path / "export")
        expected = [f"meft_ds: {tmp_path / 'export'} was trained on {recorded}; loading it into {loaded} (same "
                    "architecture and shape)."] if warned else []  # fmt: skip
        assert [r.getMessage() for r in caplog.records if r.name == "meft_ds"] == expected, (recorded, loaded)


def test_a_base_parameter_trained_beside_the_adapters_is_named_as_not_exported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A classification head (here the LM head) unfrozen after inject trains, and the export silently left it out."""
    model = meft_ds.inject(tiny_model(), MEFT)
    with caplog.at_level(logging.WARNING, logger="meft_ds"):
        meft_ds.save_adapter(model, tmp_path / "adapters only")
        assert not caplog.records
        model.lm_head.weight.requires_grad_(True)
        meft_ds.save_adapter(model, tmp_path / "with a head")
    (message,) = [record.getMessage() for record in caplog.records]
    assert message.startswith("meft_ds: the model also trains lm_head.weight, which the meft adapter's export does")


def test_broken_foreign_or_newer_exports_are_refused_with_the_fix(tmp_path: Path, trained: tuple) -> None:
    with pytest.raises(CheckpointError, match=r"no exported meft adapter here .*Fix: point at"):
        meft_ds.load_adapter(tiny_model(), tmp_path / "missing")
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    save_file({"x": torch.zeros(1)}, str(lora / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match=r"not a meft adapter \(peft_type 'LORA'\).*peft.PeftModel"):
        meft_ds.load_adapter(tiny_model(), lora)

    export = tmp_path / "export"
    meft_ds.save_adapter(trained[0], export)
    config = json.loads((export / "adapter_config.json").read_text())
    (export / "adapter_config.json").write_text(json.dumps({**config, "format_version": 3}))
    with pytest.raises(CheckpointError, match=r"format_version 3.*reads formats up to 2. Fix: upgrade meft_ds"):
        meft_ds.load_adapter(tiny_model(), export)
    (export / "adapter_config.json").write_text(json.dumps({**config, "num_neurnos": 64}))
    with pytest.raises(CheckpointError, match=r"meft.num_neurnos: unknown setting"):
        meft_ds.load_adapter(tiny_model(), export)
    # the weights of another export beside this config (a save killed between its renames): refused, not mixed
    (export / "adapter_config.json").write_text(json.dumps({**config, "export_id": "0" * 32}))
    with pytest.raises(CheckpointError, match=r"belongs to another export .* Fix: export the adapter again"):
        meft_ds.load_adapter(tiny_model(), export)


def rewrite_weights(file: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Rewrite one safetensors file of an export with ``change`` applied to its tensors, keeping its metadata."""
    with safe_open(str(file), framework="pt") as handle:
        tensors, metadata = {name: handle.get_tensor(name) for name in handle.keys()}, handle.metadata()  # noqa: SIM118
    change(tensors)
    save_file(tensors, str(file), metadata=metadata)


KEYS_0 = "base_model.model.model.layers.0.mlp.meft_adapter.keys"
DAMAGES = {  # file -> damage -> what the refusal says
    "not JSON": ("adapter_config.json", lambda path: path.write_text("{"), r"adapter_config.json: not valid JSON"),
    "not an object": ("adapter_config.json", lambda path: path.write_text("[]"), r"expected a JSON object"),
    "a field missing": ("adapter_config.json", lambda path: edit_json(path, lambda c: c.pop("layers")),
                        r"'layers' is missing\. Fix: re-export the adapter"),
    "layers and modules apart": ("adapter_config.json", lambda path: edit_json(path, lambda c: c["layers"].pop()),
                                 r"'layers' and 'target_modules' disagree"),
    "a tensor missing": ("adapter_model.safetensors", lambda path: rewrite_weights(path, lambda t: t.pop(KEYS_0)),
                         rf"tensor {KEYS_0} is missing\. Fix: re-export the adapter"),
    "a tensor cut short": ("adapter_model.safetensors",
                           lambda path: rewrite_weights(path, lambda t: t.update({KEYS_0: t[KEYS_0][:32]})),
                           rf"{KEYS_0} is \(32, 64\), the adapter's settings .* give \(64, 64\)"),
    "an index without its map": ("adapter_model.safetensors.index.json",
                                 lambda path: edit_json(path, lambda c: c.pop("weight_map")), r"no 'weight_map'"),
    "a shard missing": ("adapter_model-00002-of-00003.safetensors", lambda path: path.unlink(),
                        r"00002-of-00003.safetensors: missing \(named by adapter_model.safetensors.index.json\)"),
}  # fmt: skip


def edit_json(path: Path, change: Callable[[dict], object]) -> None:
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_export_files_are_refused_naming_the_file_and_the_fix(
    tmp_path: Path, trained: tuple, damage: str
) -> None:
    file, change, message = DAMAGES[damage]
    sharded = "index" in file or "-of-" in file
    meft_ds.save_adapter(trained[0], tmp_path, max_shard_size=40_000 if sharded else "5GB")
    change(tmp_path / file)
    model = tiny_model()
    with pytest.raises(CheckpointError, match=message):
        meft_ds.load_adapter(model, tmp_path)
    assert not adapters(model), "nothing is injected before every check has passed"


def test_a_save_that_fails_half_way_leaves_the_previous_export_whole(
    tmp_path: Path, trained: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, reference = trained
    meft_ds.save_adapter(model, tmp_path, max_shard_size=40_000)
    saved = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for adapter in adapters(model):  # a later state of training
        adapter.store.values.add_(1.0)
    calls = []

    def failing_save_file(*args: object, **kwargs: object) -> None:
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        real_save_file(*args, **kwargs)

    real_save_file = meft_ds.export.save_file
    monkeypatch.setattr(meft_ds.export, "save_file", failing_save_file)
    try:
        with pytest.raises(OSError, match="disk full"):
            meft_ds.save_adapter(model, tmp_path, max_shard_size=40_000)
    finally:
        for adapter in adapters(model):
            adapter.store.values.sub_(1.0)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == saved  # no staging folder left behind either
    assert torch.equal(logits(meft_ds.load_adapter(tiny_model(), tmp_path)), reference)


def test_staging_left_by_a_killed_export_is_removed_and_a_running_one_kept(tmp_path: Path, trained: tuple) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid is free now
    host = socket.gethostname()
    dead = tmp_path / f".meft-export.tmp-{host}-{gone.pid}"
    running = tmp_path / f".meft-export.tmp-{host}-{os.getppid()}"
    for staging in (dead, running):
        staging.mkdir()
        (staging / "adapter_model.safetensors").write_bytes(b"half")
    meft_ds.save_adapter(trained[0], tmp_path)
    assert not dead.exists() and running.exists()


def test_max_shard_size_accepts_bytes_and_units_and_refuses_the_rest() -> None:
    parse = meft_ds.export.parse_size
    assert (parse(1000), parse("5GB"), parse("500MiB"), parse("1.5 kb")) == (1000, 5 * 10**9, 500 * 2**20, 1500)
    for bad in ("5 parsecs", "", 0, -1, "GB", True):
        with pytest.raises(ValueError, match=r"max_shard_size: .* Fix: pass a positive number of bytes"):
            parse(bad)
