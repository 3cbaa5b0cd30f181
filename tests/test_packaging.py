"""A regular install carries the CPU kernels' source, and the kernels build from it; without kernels, meft_ds stops
with the fix unless the user asked for the pure-torch fallback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

import meft_ds.ops as ops

ROOT = Path(__file__).resolve().parents[1]
KERNEL = "meft_ds/csrc/meft_cpu.cpp"


def build(kind: str, out: Path) -> Path:
    """A wheel or an sdist of this checkout, built offline with the installed setuptools (as pip would)."""
    code = f"from setuptools import build_meta; print(build_meta.build_{kind}({str(out)!r}))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return out / result.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_the_wheel_carries_the_kernels_and_they_build_from_an_install(tmp_path: Path) -> None:
    wheel = build("wheel", tmp_path)
    assert KERNEL in zipfile.ZipFile(wheel).namelist()
    with tarfile.open(build("sdist", tmp_path)) as sdist:
        assert any(name.endswith(KERNEL) for name in sdist.getnames())

    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
        check=True, capture_output=True,
    )  # fmt: skip
    check = (
        "import meft_ds.ops as ops, torch\n"
        "kernels = ops.cpu_kernels()\n"
        "rows = torch.randn(8, 2, 4)\n"
        "out = torch.empty(3, 2, 4)\n"
        "kernels.gather_rows(rows, torch.tensor([1, 5, 6]), out, 1)\n"
        "assert torch.equal(out, rows[[1, 5, 6]])\n"
        "print(ops.SOURCE)\n"
    )
    # a cache of its own: the same extension name built from another path would make the shared cache rebuild
    env = {**os.environ, "PYTHONPATH": str(site), "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")}
    env.pop(ops.TORCH_FALLBACK_ENV, None)
    result = subprocess.run(
        [sys.executable, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == str(site / KERNEL), "the kernels must build from the install"


def test_without_kernels_meft_ds_stops_with_the_fix_unless_the_fallback_is_asked_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(self: object, verbose: bool = False) -> None:
        raise RuntimeError("Error building extension 'meft_cpu': no compiler")

    monkeypatch.setattr(ops.MeftCPUBuilder, "load", broken)
    monkeypatch.delenv(ops.TORCH_FALLBACK_ENV, raising=False)
    ops._build.cache_clear()
    try:
        with pytest.raises(ops.KernelBuildError, match=r"no compiler.*Fix: install a C\+\+ compiler and ninja"):
            ops.cpu_kernels()
        with pytest.raises(ops.KernelBuildError, match=ops.TORCH_FALLBACK_ENV):
            ops.cpu_kernels()  # every call: nothing runs slowly behind the user's back
        monkeypatch.setenv(ops.TORCH_FALLBACK_ENV, "1")
        ops._warn_fallback.cache_clear()
        with pytest.warns(UserWarning, match="slower pure-torch code runs instead"):
            assert ops.cpu_kernels() is None
    finally:
        ops._build.cache_clear()


def test_the_launcher_stops_in_one_line_before_loading_the_model_without_kernels(tmp_path: Path) -> None:
    code = (
        "import runpy, sys\n"
        "import meft_ds.ops as ops\n"
        "def broken(self, verbose=False):\n"
        "    raise RuntimeError('no compiler')\n"
        "ops.MeftCPUBuilder.load = broken\n"
        f"sys.argv = ['launch/train.py', '--output_dir', {str(tmp_path)!r}]\n"
        "sys.path.insert(0, 'launch')\n"  # as `python launch/train.py` does: it imports train_args beside it
        "runpy.run_path('launch/train.py', run_name='__main__')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != ops.TORCH_FALLBACK_ENV}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: meft_ds: its CPU kernels could not be built (RuntimeError: no compiler). Fix:")
    assert "loaded in" not in result.stderr, "the model must not load first"


def test_a_lock_left_by_an_interrupted_build_is_named_instead_of_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kernel build killed mid-way leaves its lock file, and torch waited for it forever before building or loading
    that op again: the next run hung without a word."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "cpu_adam" / "lock"  # $TORCH_EXTENSIONS_DIR/<op>/lock, as torch builds there
    lock.parent.mkdir(parents=True)
    lock.touch()
    ops.check_build_locks.__wrapped__()  # a build that may be running now: waited for, as torch does
    an_hour_ago = time.time() - 3600
    os.utime(lock, (an_hour_ago, an_hour_ago))
    expected = rf"{re.escape(str(lock))}: the lock of a kernel build that was interrupted, 60 minutes ago; .*Fix: del"
    with pytest.raises(ops.KernelBuildError, match=expected):
        ops.check_build_locks.__wrapped__()
