"""Models: the built-in one converted once from its GGUF file into the cache, every form of --model resolved to what
from_pretrained loads or to one clear error, and the built-in model as a plain model that trains and saves."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model, word_tokenizer

from meft_ds import models
from meft_ds.model_facts import load_model_config


def test_the_builtin_model_is_converted_once_into_the_cache_and_loaded_from_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The conversion's bookkeeping, with a tiny model standing in for the GGUF file's (the real one is converted by
    the first test that loads the built-in model, e.g. test_smollm2_chat_template_masks_its_prompt)."""
    monkeypatch.setenv("MEFT_DS_CACHE", str(tmp_path))
    real, ggufs_loaded = models._from_pretrained, []

    def from_pretrained(source: str, gguf_file: str | None, dtype: torch.dtype, name: str) -> tuple:
        if gguf_file is None:
            return real(source, gguf_file, dtype, name)
        ggufs_loaded.append(gguf_file)
        model = tiny_model()  # marked quantized, as transformers 5 leaves a model it dequantized from a GGUF file
        model.config.quantization_config = {"quant_method": "gguf", "gguf_file": gguf_file, "dequantize": False}
        model.hf_quantizer, model.is_quantized = object(), True
        return model, word_tokenizer(chat=True)

    monkeypatch.setattr(models, "_from_pretrained", from_pretrained)
    model, tokenizer = models.load_model_and_tokenizer(None)
    again, _ = models.load_model_and_tokenizer(models.BUILTIN_MODEL, dtype=torch.bfloat16)
    assert ggufs_loaded == [models.builtin_model_file().name], "converted once, then loaded from the cache"
    (folder,) = tmp_path.iterdir()  # published; no staging folder left behind
    assert folder.name == f"{models.BUILTIN_MODEL}-{models.builtin_model_file().stat().st_size}-v2"
    # a plain model, not a quantized one (which the Trainer refuses to train and save_pretrained to save)
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert not getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is None
    assert (
        models.is_builtin_model(model) and models.is_builtin_model(again) and not models.is_builtin_model(tiny_model())
    )
    assert again.dtype == torch.bfloat16 and tokenizer.pad_token == word_tokenizer(chat=True).eos_token
    for name, weight in tiny_model().state_dict().items():
        assert torch.equal(model.state_dict()[name], weight)


def test_model_arguments_resolve_to_what_from_pretrained_loads_or_one_clear_error(tmp_path: Path) -> None:
    """A .gguf file, a folder with config.json, a folder holding exactly one .gguf file, a hub id; a path to nothing,
    and a folder with neither a config nor one GGUF file, are refused naming the argument and the fix."""
    (tmp_path / "model.gguf").touch()
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "config.json").write_text("{}")
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "weights.gguf").touch()
    (tmp_path / "two").mkdir()
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / "two" / name).touch()
    assert models.resolve_model(str(tmp_path / "model.gguf")) == (str(tmp_path), "model.gguf")
    assert models.resolve_model(str(tmp_path / "saved")) == (str(tmp_path / "saved"), None)
    assert models.resolve_model(str(tmp_path / "one")) == (str(tmp_path / "one"), "weights.gguf")
    assert models.resolve_model("HuggingFaceTB/SmolLM2-135M") == ("HuggingFaceTB/SmolLM2-135M", None)
    builtin = models.resolve_model(None)
    assert builtin == models.resolve_model(models.BUILTIN_MODEL) == (str(models.builtin_model_file().parent),
                                                                     models.builtin_model_file().name)  # fmt: skip
    for argument, error in [
        (tmp_path / "missing.gguf", "no such GGUF file"),
        (tmp_path / "two", "the folder has no config.json \\(nor exactly one .gguf file\\)"),
        (tmp_path / "nowhere", "no such file or folder"),
    ]:
        with pytest.raises(models.ModelLoadError, match=f"--model {re.escape(str(argument))}: {error}.*Fix: "):
            models.resolve_model(str(argument))


def test_a_gguf_file_dequantized_on_load_gives_an_ordinary_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers 5 marks a model it dequantized from a GGUF file as quantized (the Trainer then refuses to train
    it, save_pretrained to save it): the loader unmarks it; weights left packed (integer blocks) stay marked."""
    (tmp_path / "model.gguf").touch()

    def marked(packed: bool) -> torch.nn.Module:
        model = tiny_model()
        if packed:
            model.packed = torch.nn.Parameter(torch.zeros(4, dtype=torch.uint8), requires_grad=False)
        model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "model.gguf", "dequantize": False}
        model.hf_quantizer, model.is_quantized = object(), True
        return model

    for packed in (False, True):
        monkeypatch.setattr(models, "_from_pretrained", lambda *args, packed=packed: (marked(packed), None))
        model, _ = models.load_model_and_tokenizer(str(tmp_path / "model.gguf"))
        assert model.is_quantized == packed and (model.hf_quantizer is not None) == packed
        assert ("quantization_config" in model.config.to_dict()) == packed


def test_a_model_folder_without_a_tokenizer_is_refused_naming_the_fix(tmp_path: Path) -> None:
    tiny_model().save_pretrained(tmp_path / "model")
    with pytest.raises(models.ModelLoadError, match=r"no tokenizer could be loaded from .*Fix: save the model's "):
        models.load_model_and_tokenizer(str(tmp_path / "model"))


def test_a_model_the_hub_cannot_give_is_refused_naming_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline (or a wrong id), transformers raises an OSError; the loader says what was asked and what to do."""
    import transformers

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(models.ModelLoadError) as error:
        models.load_model_and_tokenizer("someone/some-model")
    assert str(error.value).startswith(
        "--model someone/some-model: not a local model and it could not be loaded from the Hugging Face hub (OSError: "
        "We couldn't connect to 'https://huggingface.co' to load the files.). Fix: pass a local folder "
        "(save_pretrained) or .gguf file"
    )
    assert f"--model {models.BUILTIN_MODEL}" in str(error.value)
    with pytest.raises(models.ModelLoadError) as checked:  # train.py's check before loading says the same
        load_model_config("someone/some-model", weights=True)
    assert str(checked.value).startswith("--model someone/some-model: not a local model and it could not be loaded")


def test_a_source_without_weights_is_refused_for_training_and_taken_for_the_plan(tmp_path: Path) -> None:
    """The memory plan takes a config.json or a built-in configuration (llama-2-7b); training cannot: train.py
    passed its check, then failed loading ("no such file or folder" for an existing config.json, a hub timeout for
    llama-2-7b). A file that is not a .gguf file is named as such."""
    tiny_model().config.save_pretrained(tmp_path)
    config_file = str(tmp_path / "config.json")
    for source in ("llama-2-7b", config_file):
        assert load_model_config(source).num_hidden_layers > 0
        with pytest.raises(models.ModelLoadError, match=r"a configuration without weights, which only the memory plan"):
            load_model_config(source, weights=True)
    assert load_model_config(models.BUILTIN_MODEL, weights=True).num_hidden_layers == 30
    with pytest.raises(models.ModelLoadError, match=r"config.json: a file, but not a .gguf file\. Fix: point at the f"):
        models.load_model_and_tokenizer(config_file)


@pytest.mark.slow
def test_the_builtin_model_loads_as_a_plain_model_that_trains_and_saves(tmp_path: Path) -> None:
    """Converted from a GGUF file, it is still an ordinary fp32 model: transformers does not take it for a quantized
    one (the Hugging Face Trainer then refused to train it, and save_pretrained, at the end of a full fine-tuning run,
    to save it)."""
    model, _ = models.load_model_and_tokenizer(None)
    assert not getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is None  # the Trainer's
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").stat().st_size > 4 * 134_000_000  # every weight, in fp32
