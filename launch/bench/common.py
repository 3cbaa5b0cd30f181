"""What every experiment shares: run settings (full and quick), the real model and text, timing, the result type and
its prose (``sections.md``'s templates, filled with what was measured)."""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import functools
import gc
import os
import re
import shlex
import statistics
import string
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from meft_ds.config import MeftConfig, merge_settings

GB = 1e9
MB = 1e6
SECTIONS = Path(__file__).with_name("sections.md")


@dataclass(frozen=True)
class Settings:
    """Sizes and repetitions of one run. ``full()`` is the documented run (~20 min on 2 cores), ``quick()`` ~5 min."""

    micro_batch: int = 2  # the paper's setting: micro-batch 2 x 256 tokens
    seq_len: int = 256
    top_k: int = 64
    accum_steps: int = 32  # the paper's effective batch 64 = 2 x 32
    # a. traffic
    traffic_neurons: tuple[int, ...] = (4096, 16384)
    traffic_plain_micro_steps: int = 3  # micro-steps measured without the cache (their bytes do not depend on G)
    train_steps: int = 8
    train_lr: float = 1e-3
    # b. sparse Adam
    adam_rows: int = 16384
    adam_width: int = 2 * 4096
    adam_fractions: tuple[float, ...] = (0.1, 0.25, 0.4)
    adam_repeats: int = 5
    # c. step time
    step_neurons: int = 16384
    step_repeats: int = 3
    lora_rank: int = 16
    # d. device bytes
    memory_neurons: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
    memory_layer: int = 15
    # e. routing cost
    routing_neurons: int = 16384
    routing_tokens: int = 512
    routing_dim: int = 576
    routing_probe: int = 8
    routing_experts: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048)
    routing_repeats: int = 7
    # f. scale out: each variant in processes of its own (its memory its own), or all in one launch (tests: faster)
    scaleout_launch_per_variant: bool = True
    # quality
    quality_grids: str = "all"  # launch/bench/quality_grid.py: "all", "headline" (about an hour) or "quick" (CI)

    @classmethod
    def full(cls) -> Settings:
        return cls()

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            traffic_neurons=(4096,),
            traffic_plain_micro_steps=1,
            accum_steps=4,
            train_steps=2,
            adam_rows=4096,
            adam_fractions=(0.1, 0.4),
            adam_repeats=3,
            step_neurons=4096,
            step_repeats=2,
            memory_neurons=(1024, 4096, 16384, 65536),
            routing_experts=(16, 64, 256, 1024, 2048),
            routing_repeats=3,
            quality_grids="quick",
        )


@dataclass
class Section:
    """One experiment's result: what it measures, how, the table, the target verdict; rendered into BENCHMARKS.md."""

    key: str
    title: str
    what: str
    how: str
    columns: list[str]
    rows: list[list[Any]]
    target: str
    met: bool | None  # None: the target could not be judged in this run (e.g. a variant was skipped)
    verdict: str
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)  # the raw numbers behind the table and the plot
    command: str = ""
    mode: str = ""
    measured_at: str = ""
    seconds: float = 0.0
    plot: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> Section:
        return cls(**values)


@dataclass
class Context:
    """Everything an experiment needs from the run: settings, the command line, ``--meft`` overrides, the model.

    ``model``/``tokenizer`` default to the real pretrained SmolLM2-135M-Instruct (fp32, frozen), loaded on first use;
    ``micro_batches`` to packed ``facts`` text. Tests pass a tiny model and tokenizer instead.
    """

    settings: Settings
    command: str
    overrides: dict[str, Any] = field(default_factory=dict)
    cache_mb: float | None = None  # ``--cache-mb``: a.'s cache budget; None: the dense adapter's device bytes
    model: nn.Module | None = None
    tokenizer: Any = None
    micro_batches: list[dict[str, torch.Tensor]] | None = None
    kept_freed_memory: bool = False  # meft_ds.keep_freed_host_memory() applied to this process (launch/bench.py)

    def base(self) -> nn.Module:
        """The frozen base model (loaded once per run, ~20-40 s for SmolLM2)."""
        if self.model is None:
            from meft_ds.models import load_model_and_tokenizer

            self.model, self.tokenizer = load_model_and_tokenizer(None)
        self.model.requires_grad_(False)
        return self.model

    def fresh_model(self) -> nn.Module:
        """A private copy of the frozen base model, for one variant (adapters cannot be removed once added)."""
        return copy.deepcopy(self.base())

    def batches(self) -> list[dict[str, torch.Tensor]]:
        """Micro-batches of real text: the ``facts`` training examples tokenized with the chat template, packed."""
        if self.micro_batches is None:
            self.base()
            self.micro_batches = packed_batches(self.tokenizer, self.settings.micro_batch, self.settings.seq_len)
        return self.micro_batches

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        batches = self.batches()
        return batches[index % len(batches)]

    def meft(self, values: dict[str, Any], variant: dict[str, Any] | None = None) -> MeftConfig:
        """``MeftConfig`` from the experiment's values, the user's ``--meft`` overrides and the variant's own keys
        (which win)."""
        return MeftConfig.from_dict(merge_settings(merge_settings(values, self.overrides), variant or {}))


def packed_batches(tokenizer: Any, micro_batch: int, seq_len: int) -> list[dict[str, torch.Tensor]]:
    """The ``facts`` examples (prompt and answer, labels only on the answer) concatenated and cut into
    ``(micro_batch, seq_len)`` blocks, so every token is real text and no token is padding."""
    from meft_ds.data import load_examples, tokenize_for_training

    features = tokenize_for_training(load_examples("facts"), tokenizer, max_length=seq_len)
    tokens = {key: torch.tensor([token for f in features for token in f[key]]) for key in ("input_ids", "labels")}
    block = micro_batch * seq_len
    return [
        {key: values[i * block : (i + 1) * block].view(micro_batch, seq_len) for key, values in tokens.items()}
        for i in range(tokens["input_ids"].numel() // block)
    ]


def stats_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The ``meft_ds.stats`` counters that moved between two readings."""
    return {key: after[key] - before.get(key, 0) for key in after}


def build_meft(model: nn.Module, config: MeftConfig, lr: float) -> tuple[nn.Module, list[Any]]:
    """Inject MEFT adapters into ``model``; the sparse Adam for the rows and an AdamW for the routers."""
    import meft_ds

    meft_ds.inject(model, config)
    sparse = meft_ds.SparseRowAdam(meft_ds.adapters(model), lr=lr)
    dense = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    return model, [sparse, dense]


def optimizer_step(optimizers: list[Any]) -> None:
    for optimizer in optimizers:
        optimizer.step()
    for optimizer in optimizers:
        optimizer.zero_grad()


def step_function(
    model: nn.Module, optimizers: list[Any], batch_of: Callable[[int], dict]
) -> Callable[[], torch.Tensor]:
    """One training step (forward, backward, optimizer step, zero_grad) per call, each on the next micro-batch; the
    call returns its loss."""
    counter = iter(range(10**9))

    def step() -> torch.Tensor:
        loss = model(**batch_of(next(counter))).loss
        loss.backward()
        optimizer_step(optimizers)
        return loss.detach()

    return step


def alternating_seconds(
    calls: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1, setup: Callable[[], Any] = lambda: None
) -> dict[str, list[float]]:
    """Each call's wall times: ``warmup`` untimed calls each, then ``rounds`` rounds timing one call of each in turn,
    so that all see the same machine (other load, clock) at the same times; ``setup()`` runs untimed before each."""
    for call in calls.values():
        for _ in range(warmup):
            setup()
            call()
    times: dict[str, list[float]] = {label: [] for label in calls}
    for _ in range(rounds):
        for label, call in calls.items():
            setup()
            start = time.perf_counter()
            call()
            times[label].append(time.perf_counter() - start)
    return times


def median_seconds(
    fn: Callable[[], Any], *, repeats: int, warmup: int = 1, setup: Callable[[], Any] = lambda: None
) -> tuple[float, list[float]]:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones, and every timing;
    ``setup()`` runs untimed before each call."""
    times = alternating_seconds({"": fn}, repeats, warmup, setup)[""]
    return statistics.median(times), times


def free_memory() -> None:
    """Collect garbage and give freed heap memory back to the OS: glibc keeps freed blocks of a few MB in its arenas,
    so without ``malloc_trim`` a freed 7 GB row store still counts against the next variant's memory."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def proc_bytes(path: str, field: str) -> int | None:
    """The value of a ``field:  N kB`` line of a Linux /proc file, in bytes; None where it cannot be read."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def fits_in_memory(needed: float, what: str, notes: list[str]) -> bool:
    """Whether ``needed`` bytes are available now; if not, a note (printed and kept) says ``what`` was skipped, so a
    run on a busy or small machine degrades instead of being killed."""
    free_memory()
    available = proc_bytes("/proc/meminfo", "MemAvailable")
    available = 1 << 62 if available is None else available  # not Linux: effectively unlimited
    if needed <= available:
        return True
    note = f"{what} skipped: it needs about {fmt_bytes(needed)} of memory, {fmt_bytes(available)} was available"
    print(f"  note: {note}")
    notes.append(note)
    return False


def run_process(command: list[str], cwd: Path, timeout: float | None = None, **env: str) -> None:
    """Run ``command`` in this environment less any distributed rank of its own (tests set one), plus ``env``; if it
    fails, raise with the end of its output."""
    dropped = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR", "GROUP_RANK")
    env = {k: v for k, v in os.environ.items() if k not in dropped} | env
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")


def fmt_bytes(value: float) -> str:
    """Bytes in the largest unit that keeps a number >= 1 (decimal units: 1 GB = 1e9 B)."""
    for unit, scale in (("GB", GB), ("MB", MB), ("kB", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.0f} B"


def fmt_ratio(value: float) -> str:
    return f"{value:.2f}x" if value < 10 else f"{value:.1f}x"


class _Formatter(string.Formatter):
    """``str.format`` with two more specs: ``{x:bytes}`` (:func:`fmt_bytes`) and ``{x:ratio}`` (:func:`fmt_ratio`)."""

    def format_field(self, value: Any, format_spec: str) -> str:
        formats = {"bytes": fmt_bytes, "ratio": fmt_ratio}
        return formats[format_spec](value) if format_spec in formats else super().format_field(value, format_spec)


@functools.cache
def templates() -> dict[str, dict[str, str]]:
    """``sections.md``: per experiment (``## key``), per text (``### name``), its raw lines."""
    found: dict[str, dict[str, str]] = {}
    for block in re.split(r"^## ", SECTIONS.read_text(), flags=re.MULTILINE)[1:]:
        key, _, body = block.partition("\n")
        parts = (part.partition("\n") for part in re.split(r"^### ", body, flags=re.MULTILINE)[1:])
        found[key.strip()] = {name.strip(): lines.strip() for name, _, lines in parts}
    return found


def paragraphs(key: str, name: str, **values: Any) -> list[str]:
    """Experiment ``key``'s text ``name``, filled with ``values``: one string per paragraph, its lines joined."""
    blocks = re.split(r"\n\s*\n", templates()[key][name])
    return [_Formatter().vformat(" ".join(block.splitlines()), (), values) for block in blocks]


def text(key: str, name: str, **values: Any) -> str:
    """Experiment ``key``'s text ``name``, filled with ``values``, its paragraphs joined by spaces."""
    return " ".join(paragraphs(key, name, **values))


def section(key: str, values: dict[str, Any], **fields: Any) -> Section:
    """Experiment ``key``'s result: title, what, how, target, verdict and columns from ``sections.md`` filled with
    ``values``, unless ``fields`` gives them (a column named twice is shown once); ``fields`` gives the rest (rows,
    met, notes, data)."""
    prose = {
        name: text(key, name, **values) for name in ("title", "what", "how", "target", "verdict") if name not in fields
    }
    columns = list(dict.fromkeys(_Formatter().vformat(c, (), values) for c in templates()[key]["columns"].splitlines()))
    return Section(key=key, **{**prose, "columns": columns, **fields})
