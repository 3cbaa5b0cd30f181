from __future__ import annotations

import re
from pathlib import Path

import pytest
from tiny_models import tiny_model

import meft_ds
from meft_ds import MeftConfig, MeftConfigError


def test_defaults_follow_spec() -> None:
    config = MeftConfig()
    assert (config.num_neurons, config.top_k, config.n_probe, config.gate) == (4096, 64, 8, "logit")
    assert config.num_experts == 256  # 4 * sqrt(4096)
    assert MeftConfig(num_neurons=8464).num_experts == 368  # 4 * 92, LLaMA-7B's r = 92^2
    assert MeftConfig(num_neurons=3600).num_experts == 240  # 4 * 60, Mistral-7B's r
    assert MeftConfig(num_neurons=16, top_k=4).num_experts == 16


def test_default_experts_keep_probed_pool_large_enough() -> None:
    config = MeftConfig(num_neurons=64, top_k=64)
    assert config.n_probe * config.expert_size >= config.top_k or config.n_probe >= config.num_experts


@pytest.mark.parametrize(
    ("values", "field", "fix"),
    [
        ({"num_neurons": 0}, "meft.num_neurons", "at least 1"),
        ({"num_neurons": 64.0}, "meft.num_neurons", "integer"),
        ({"top_k": 5000}, "meft.top_k", "top_k <= 4096"),
        ({"top_k": True}, "meft.top_k", "integer"),
        ({"num_experts": 100}, "meft.num_experts", "divisor of 4096"),
        ({"num_experts": 16, "n_probe": 17}, "meft.n_probe", "n_probe <= 16"),
        ({"num_neurons": 256, "num_experts": 64, "n_probe": 2, "top_k": 16}, "meft.top_k", "raise n_probe"),
        ({"gate": "softmax"}, "meft.gate", "'logit'"),
        ({"layers": []}, "meft.layers", "null for every layer"),
        ({"layers": [0, "1"]}, "meft.layers", "integer"),
        ({"key_init_std": 0}, "meft.key_init_std", "> 0"),
        ({"key_init_std": float("nan")}, "meft.key_init_std", "number"),
        ({"router_init_scale": -1}, "meft.router_init_scale", ">= 0"),
        ({"row_dtype": "int8"}, "meft.row_dtype", "'bf16'"),
        ({"lr": -1e-4}, "meft.lr", ">= 0"),
        ({"betas": [0.9]}, "meft.betas", "[0.9, 0.999]"),
        ({"betas": [0.9, 1.0]}, "meft.betas[1]", "[0, 1)"),
        ({"eps": 0}, "meft.eps", "> 0"),
        ({"top_kk": 8}, "meft.top_kk", "did you mean 'top_k'"),
        ({"store": {"device": "nvme"}}, "meft.store.nvme_path", '"nvme_path": "/local_nvme/meft"'),
        ({"store": {"device": "nvme", "nvme_path": "/tmp/x", "shard": True}}, "meft.store.shard", "shard=false"),
        ({"store": {"nvme_path": "/tmp/x"}}, "meft.store.nvme_path", '"device": "nvme"'),
    ],
)
def test_each_wrong_value_names_field_and_fix(values: dict, field: str, fix: str) -> None:
    with pytest.raises(MeftConfigError) as error:
        MeftConfig.from_dict(values)
    message = str(error.value)
    assert message.startswith(field + ":"), message
    assert "Fix:" in message and fix in message, message


def test_section_must_be_a_mapping() -> None:
    with pytest.raises(MeftConfigError, match="expected a JSON object"):
        MeftConfig.from_dict([1, 2])  # type: ignore[arg-type]


def test_unknown_layer_index_is_rejected_at_inject() -> None:
    model = tiny_model(layers=2)
    with pytest.raises(MeftConfigError, match=r"meft.layers: layer index 5 does not exist .* 2 layers"):
        meft_ds.inject(model, {"num_neurons": 64, "top_k": 4, "layers": [0, 5]})
    assert not meft_ds.adapters(model), "a failed inject must leave the model untouched"


def test_duplicate_layer_index_is_rejected() -> None:
    with pytest.raises(MeftConfigError, match="names a layer twice"):
        meft_ds.inject(tiny_model(layers=2), {"num_neurons": 64, "top_k": 4, "layers": [1, -1]})


def test_round_trip_through_dict() -> None:
    config = MeftConfig(num_neurons=256, top_k=8, layers=[1], betas=(0.8, 0.9))
    assert MeftConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"optimizer": {"type": "Adamm", "params": {}}}, "optimizer.type: 'Adamm'"),
        ({"scheduler": {"type": "Cosine", "params": {}}}, "scheduler.type: 'Cosine'"),
        ({"optimizer": "AdamW"}, "optimizer: expected a JSON object"),
        ({"scheduler": {"type": "WarmupLR", "params": [1]}}, "scheduler.params: expected a JSON object"),
        ({"zero_optimization": {"stage": 4}}, "zero_optimization.stage: 4"),
        ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "gpu"}}}, "offload_optimizer.device"),
        ({"gradient_clipping": -1}, "gradient_clipping: expected a number >= 0"),
        ({"train_micro_batch_size_per_gpu": 0}, "train_micro_batch_size_per_gpu: expected a positive integer"),
        (
            {"train_batch_size": 16},
            "train_batch_size: 16 is not train_micro_batch_size_per_gpu x "
            "gradient_accumulation_steps x ranks = 8 x 1 x 1 = 8. Fix: set it to 8",
        ),
        (
            {"optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "betaz": [0.9, 0.99]}}},
            "optimizer.params.betaz: not a parameter of AdamW as DeepSpeed builds it. Fix: remove it (did you mean "
            "'betas'?)",
        ),
        ({"optimizer": {"type": "AdamW", "params": {"max_grad_norm": 1.0}}}, "(did you mean gradient_clipping at"),
        ({"optimizer": {"type": "RMSprop", "params": {"lr": 0.1, "momentun": 0.9}}}, "'momentum'?"),
    ],
)
def test_deepspeed_config_mistakes_are_named(change: dict, message: str) -> None:
    import json
    from pathlib import Path

    from meft_ds.ds_config import resolve_auto, validate_deepspeed_config

    config = json.loads((Path(__file__).parents[1] / "ds_configs" / "meft.json").read_text())
    config.update(change)
    with pytest.raises(MeftConfigError, match=re.escape(message)) as error:
        validate_deepspeed_config(resolve_auto(config, max_steps=10))
    assert "Fix:" in str(error.value)


def test_deepspeed_config_values_that_are_right_pass() -> None:
    import json
    from pathlib import Path

    from meft_ds.ds_config import resolve_auto, validate_deepspeed_config

    config = json.loads((Path(__file__).parents[1] / "ds_configs" / "meft.json").read_text())
    config["train_batch_size"] = 8 * 2  # 8 a micro-batch x 2 accumulation steps x 1 rank
    adam_keys = {"lr": 1e-4, "bias_correction": True, "adam_w_mode": True, "torch_adam": False, "amsgrad": False}
    config["optimizer"] = {"type": "Adam", "params": adam_keys | {"fp32_optimizer_states": True}}
    validate_deepspeed_config(resolve_auto(config, max_steps=10, gradient_accumulation_steps=2))


def test_global_batch_size_is_the_given_total_or_micro_batch_times_accumulation_times_ranks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from meft_ds import ds_config
    from meft_ds.ds_config import global_batch_size, resolve_auto

    monkeypatch.setattr(ds_config, "_ranks", lambda: 3)  # the process group's size, or WORLD_SIZE before there is one
    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}
    assert global_batch_size(resolve_auto(config, micro_batch_size=4, gradient_accumulation_steps=2)) == 4 * 2 * 3
    assert global_batch_size({"train_batch_size": 24, "gradient_accumulation_steps": 2}) == 24
    assert global_batch_size({"train_micro_batch_size_per_gpu": 5}) == 5 * 3


def test_auto_steps_without_max_steps_is_named() -> None:
    import json
    from pathlib import Path

    from meft_ds.ds_config import resolve_auto

    config = json.loads((Path(__file__).parents[1] / "ds_configs" / "meft.json").read_text())
    with pytest.raises(MeftConfigError, match="total_num_steps / warmup_num_steps are 'auto'"):
        resolve_auto(config)


def test_huge_neuron_counts_validate_instantly() -> None:
    config = MeftConfig(num_neurons=2**40, top_k=64)  # divisors are found in O(sqrt(r)), not O(r)
    assert config.num_neurons % config.num_experts == 0


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parents[1] / "ds_configs").glob("*.json")), ids=lambda p: p.name
)
def test_every_shipped_config_is_valid(path: Path) -> None:
    import json

    from meft_ds.ds_config import resolve_auto, validate_deepspeed_config

    config = json.loads(path.read_text())
    validate_deepspeed_config(resolve_auto(config, max_steps=100))
    assert MeftConfig.from_dict(config["meft"]).num_neurons > 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"train_batch_size": 8,}', r"not valid JSON \(line 1, column 24: .*\)\. Fix: correct the file"),
        ("[1, 2]", r"the top level must be a JSON object\. Fix: wrap the settings in \{\.\.\.\}"),
    ],
)
def test_a_deepspeed_config_file_missing_or_not_a_json_object_is_named(tmp_path, text: str, message: str) -> None:
    from meft_ds.ds_config import load_deepspeed_config

    path = tmp_path / "ds.json"
    path.write_text(text)
    with pytest.raises(MeftConfigError, match=rf"^{re.escape(str(path))}: {message}"):
        load_deepspeed_config(path)
    with pytest.raises(MeftConfigError, match=r"ds_missing\.json: no such file\. Fix: pass the path"):
        load_deepspeed_config(tmp_path / "ds_missing.json")


def test_overrides_set_one_setting_of_a_section_and_merge_into_it() -> None:
    from meft_ds.config import merge_settings
    from meft_ds.training import parse_overrides

    base = {"num_neurons": 64, "store": {"device": "nvme", "nvme_path": "/x", "shard": True}}
    overrides = parse_overrides(["store.shard=false", "top_k=8", 'store={"ram_budget_mb": 512}'])
    assert overrides == {"store": {"shard": False, "ram_budget_mb": 512}, "top_k": 8}
    store = {"device": "nvme", "nvme_path": "/x", "shard": False, "ram_budget_mb": 512}
    assert merge_settings(base, overrides) == {"num_neurons": 64, "top_k": 8, "store": store}
    assert base["store"]["shard"] is True, "the base is not changed"
    assert merge_settings(base, {"store": None}) == {"num_neurons": 64, "store": None}  # not a section: replaces
    for bad in ("store.=1", ".shard=1", "store..shard=1", "=1"):
        with pytest.raises(MeftConfigError, match=r"expected KEY=VALUE\. Fix: e\.g\. --meft num_neurons=8192 or "):
            parse_overrides([bad])


def test_every_meft_setting_is_explained_in_the_configs_readme() -> None:
    """ds_configs/README.md explains the "meft" section key by key (three keys were missing from its table)."""
    import dataclasses

    from meft_ds.config import StoreConfig

    text = (Path(__file__).parents[1] / "ds_configs" / "README.md").read_text()
    table = text.split('## The `"meft"` section', 1)[1]
    keys = [f.name for f in dataclasses.fields(MeftConfig) if f.init and f.name != "store"]
    keys += [f"store.{f.name}" for f in dataclasses.fields(StoreConfig) if f.init]
    missing = [key for key in keys if f"`{key}`" not in table]
    assert not missing, f"not in ds_configs/README.md's meft table: {missing}"
