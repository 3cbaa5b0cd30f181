"""A launcher script (``launch/<name>.py``) loaded as a module, for tests that call its functions in-process."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

LAUNCH = Path(__file__).resolve().parents[1] / "launch"


def launch_script(name: str) -> ModuleType:
    """``launch/<name>.py`` as a fresh module (its ``__main__`` block not run), its folder importable as when it runs
    as a script (``train.py`` imports ``train_args``)."""
    if str(LAUNCH) not in sys.path:
        sys.path.insert(0, str(LAUNCH))
    spec = importlib.util.spec_from_file_location(f"{name}_cli", LAUNCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
