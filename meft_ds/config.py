"""`MeftConfig`: every knob of the sparse key-expert adapters, validated once, at the edge.

A config comes from keyword arguments, from a dict, or from the ``"meft"`` section of a DeepSpeed JSON config.
Every wrong value raises :class:`MeftConfigError` naming the field and the fix, before any tensor is allocated.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any

import torch

GATE_MODES = ("logit", "none")
BIAS_CORRECTIONS = ("global", "per_row")
CLIP_ROWS = ("global", "separate", "none")
ROW_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,  # rows travel in the dtype the adapter's input has (bf16 under DeepSpeed bf16, else fp32)
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


class MeftConfigError(ValueError):
    """A configuration value is wrong; the message names the field and how to fix it."""


def _fail(field_name: str, problem: str, fix: str) -> None:
    raise MeftConfigError(f"meft.{field_name}: {problem}. Fix: {fix}.")


def _reject_unknown_keys(prefix: str, values: dict[str, Any], known: list[str]) -> None:
    """Raise for the first key of ``values`` not in ``known``, suggesting the closest known key (or listing them)."""
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
            _fail(f"{prefix}{key}", "unknown setting", f"remove it ({hint})")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(name, f"expected an integer, got {value!r} ({type(value).__name__})", f"set {name} to an integer")
    if value < minimum:
        _fail(name, f"must be >= {minimum}, got {value}", f"set {name} to at least {minimum}")


def _check_float(name: str, value: Any, minimum: float, *, strict: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(name, f"expected a finite number, got {value!r}", f"set {name} to a number")
    if value < minimum or (strict and value == minimum):
        relation = ">" if strict else ">="
        _fail(name, f"must be {relation} {minimum}, got {value}", f"set {name} {relation} {minimum}")


def divisors(n: int) -> list[int]:
    """The divisors of ``n``, ascending, in O(sqrt(n))."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def default_num_experts(num_neurons: int, top_k: int, n_probe: int) -> int:
    """The divisor of ``num_neurons`` closest (in log scale) to 4*sqrt(r), SPEC.md's choice, among those whose
    probed pool (``n_probe`` experts) still holds at least ``top_k`` neurons."""
    target = 4.0 * math.sqrt(num_neurons)
    feasible = [e for e in divisors(num_neurons) if min(n_probe, e) * (num_neurons // e) >= top_k] or [1]
    return min(feasible, key=lambda e: (abs(math.log(e / target)), e))


STORE_DEVICES = ("cpu", "nvme")


def merge_settings(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` (neither changed): a setting that is a section (a dict) on both sides is merged
    key by key, e.g. ``{"store": {"shard": False}}`` into a config's ``"store"`` section; any other value replaces."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_settings(merged[key], value)
        else:
            merged[key] = value
    return merged


@dataclass
class StoreConfig:
    """Where the row stores live (the ``"store"`` object of the meft section).

    Args:
        device: ``"cpu"``: rows and Adam moments in CPU memory; ``"nvme"``: in files under ``nvme_path``, read and
            written through DeepSpeed's async I/O, with a CPU-memory cache of hot rows of ``ram_budget_mb``.
        shard: partition every layer's rows (and moments) across the data-parallel ranks, in blocks of whole
            key-experts: each rank holds about ``1/world`` of the store. ``False`` replicates the store on every rank.
            ``"auto"`` (default): sharded when several ranks of the run share a node (the launcher's
            ``LOCAL_WORLD_SIZE``/``LOCAL_SIZE`` > 1), where replicas would fill its memory once per rank; replicated
            otherwise (one rank per node, or the NVMe tier). Every rank must then run every forward (they are
            collective), as data-parallel training and meft_ds's evaluation do.
        nvme_path: folder for the NVMe tier's files (required with ``device="nvme"``; must be writable).
        ram_budget_mb: CPU memory (MiB, whole model) for the NVMe tier's keys and read buffers.
    """

    device: str = "cpu"
    shard: bool | str = "auto"
    nvme_path: str | None = None
    ram_budget_mb: float = 1024.0

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or self.device not in STORE_DEVICES:
            _fail("store.device", f"unknown store device {self.device!r}", "use 'cpu' or 'nvme'")
        if not isinstance(self.shard, bool) and self.shard != "auto":
            _fail("store.shard", f"expected true, false or 'auto', got {self.shard!r}", 'write true, false or "auto"')
        _check_float("store.ram_budget_mb", self.ram_budget_mb, 0.0, strict=True)
        if self.device == "nvme":
            if not isinstance(self.nvme_path, str) or not self.nvme_path:
                _fail(
                    "store.nvme_path",
                    "the NVMe tier needs a folder for its files",
                    'set "nvme_path": "/local_nvme/meft"',
                )
            if self.shard is True:
                _fail("store.shard", "a sharded NVMe store is not supported yet", "use shard=false with the NVMe tier")
        elif self.nvme_path is not None:
            _fail("store.nvme_path", "only used with device='nvme'", 'remove it or set "device": "nvme"')

    @classmethod
    def from_dict(cls, values: Any) -> StoreConfig:
        if isinstance(values, StoreConfig):
            return values
        if values is None:
            return cls()
        if not isinstance(values, dict):
            _fail("store", f"expected a JSON object, got {values!r}", 'write e.g. "store": {"shard": true}')
        _reject_unknown_keys("store.", values, [f.name for f in dataclasses.fields(cls)])
        return cls(**values)


@dataclass
class MeftConfig:
    """Sparse key-expert adapters (MEFT). Field names are the keys of the ``"meft"`` section of a DeepSpeed config.

    Args:
        num_neurons: adapter neurons per layer, ``r`` (rows of the key and value matrices).
        top_k: neurons that fire per token, ``K`` (the paper uses 64 for every task).
        num_experts: key-experts per layer, ``E``; must divide ``num_neurons``. ``None`` picks the divisor nearest
            4*sqrt(r) that keeps at least ``top_k`` neurons in the probed pool.
        n_probe: experts probed per token (their keys are scored; the token's top-K is taken among them).
        gate: ``"logit"``: activation ``ReLU(g_e(h) * (h . k_j))`` with the raw router logit ``g_e`` (the reference
            code, which produced the paper's numbers; the only path by which the router learns). ``"none"``:
            ``ReLU(h . k_j)`` (the paper's Algorithm 1; the router only chooses which experts are probed).
        layers: indices of the decoder layers that get an adapter; ``None`` means every layer. Negative indices
            count from the end.
        key_init_std: standard deviation of the N(0, std) key initialisation.
        router_init_scale: router row ``e`` starts at this scale times the mean of expert ``e``'s keys.
        row_dtype: dtype the rows, their gradients and the routing inputs (hidden states, router logits) travel in:
            ``"auto"`` (the adapter input's dtype), ``"fp32"``, ``"bf16"``, ``"fp16"`` (fp16 gradients accumulated on
            the device travel in fp32). Master rows and Adam moments always stay fp32 in CPU memory.
        seed: seed of the key initialisation (layer ``i`` uses ``seed + i``), so every rank builds the same store.
        cache_mb: device memory (MiB, for the whole model, split evenly over the adapters) for the hot-row cache:
            cached rows travel to the device once per optimizer step and their gradients back once. 0 disables it.
        prefetch_layers: pre-retrieval distance ``p``: layer ``i`` chooses its rows from the hidden states of the
            adapter ``p`` layers earlier, so their copy overlaps the layers in between. 0 (default) is exact. Not
            with activation checkpointing (its recomputed forward cannot choose the same rows again).
        max_nonfinite_steps: a row step whose gradients hold NaN or inf is skipped (rows and moments untouched);
            this many skipped in a row abort the run with :class:`meft_ds.NonFiniteGradientError`.
        bias_correction: the sparse Adam's bias correction: ``"global"`` divides by ``1 - beta**t`` with the
            optimizer's step count ``t``, as SPEC.md prescribes (a row first touched at a late step then takes a first
            update of about ``(1 - beta1) / sqrt(1 - beta2)`` = 3.2x the learning rate); ``"per_row"`` counts each
            row's own updates (4 bytes a row, saved with the store), so a row's first update is the one a fresh Adam
            makes. Not with the NVMe store yet.
        clip_rows: how DeepSpeed's ``gradient_clipping`` treats the rows' gradients: ``"global"``, one norm over the
            engine's gradients and the rows' (as the paper's dense simulation clips); ``"separate"``, the rows clipped
            by their own norm and the engine's gradients by theirs; ``"none"``, the rows not clipped at all.
        update_rows: sparse updates chosen by TF-IDF (Lin et al., 2025): at each optimizer step each adapter updates
            only this many of the rows that hold a gradient, those its tokens selected most often relative to how
            often background text selects them (:func:`meft_ds.fit_background`); the others keep their values and
            moments. 0 (default) updates every row that holds a gradient, as the paper does. Over several ranks the
            step's counts are summed, so that replicas update the same rows and shards their parts of one choice.
        store: where the row stores live: a :class:`StoreConfig` or its dict (replicated CPU memory by default).
        lr, betas, eps, weight_decay: the sparse Adam's hyperparameters. ``None`` inherits them from the DeepSpeed
            config's optimizer (and its scheduler drives the learning rate), or the defaults of
            :class:`meft_ds.SparseRowAdam` in a plain PyTorch loop.
    """

    num_neurons: int = 4096
    top_k: int = 64
    num_experts: int | None = None
    n_probe: int = 8
    gate: str = "logit"
    layers: list[int] | None = None
    key_init_std: float = 0.02
    router_init_scale: float = 50.0
    row_dtype: str = "auto"
    seed: int = 0
    cache_mb: float = 0.0
    prefetch_layers: int = 0
    max_nonfinite_steps: int = 3
    bias_correction: str = "global"
    clip_rows: str = "global"
    update_rows: int = 0
    store: StoreConfig | dict | None = None
    lr: float | None = None
    betas: tuple[float, float] | None = None
    eps: float | None = None
    weight_decay: float | None = None

    def __post_init__(self) -> None:
        self._validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, values: dict[str, Any] | MeftConfig | None) -> MeftConfig:
        """Build from a dict (e.g. the ``"meft"`` section of a DeepSpeed config); unknown keys are errors."""
        if isinstance(values, MeftConfig):
            return values
        if values is None:
            return cls()
        if not isinstance(values, dict):
            raise MeftConfigError(
                f"meft: expected a JSON object (dict) of settings, got {type(values).__name__}. "
                'Fix: write the section as {"num_neurons": 4096, "top_k": 64, ...}.'
            )
        cls.check_keys(values)
        return cls(**values)

    @classmethod
    def check_keys(cls, values: dict[str, Any]) -> None:
        """Raise for the first key of ``values`` that is not a setting (e.g. overrides checked before they are
        combined with the values they override)."""
        _reject_unknown_keys("", values, [f.name for f in dataclasses.fields(cls) if f.init])

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict (``num_experts`` resolved), e.g. for an exported adapter."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        if out["betas"] is not None:
            out["betas"] = list(out["betas"])
        out["store"] = dataclasses.asdict(out["store"])
        return out

    # ------------------------------------------------------------------ derived values
    @property
    def expert_size(self) -> int:
        """Neurons per key-expert (``r / E``); experts are contiguous blocks of rows."""
        assert self.num_experts is not None
        return self.num_neurons // self.num_experts

    @property
    def gated(self) -> bool:
        return self.gate == "logit"

    def row_torch_dtype(self, compute_dtype: torch.dtype) -> torch.dtype:
        """The dtype rows travel in, given the dtype the adapter computes in."""
        return ROW_DTYPES[self.row_dtype] or compute_dtype

    def resolve_layers(self, num_layers: int) -> list[int]:
        """The sorted, non-negative layer indices that get adapters in a model with ``num_layers`` layers."""
        if self.layers is None:
            return list(range(num_layers))
        resolved = []
        for index in self.layers:
            if not -num_layers <= index < num_layers:
                _fail(
                    "layers",
                    f"layer index {index} does not exist in a model with {num_layers} layers",
                    f"use indices in [{-num_layers}, {num_layers - 1}], or null for every layer",
                )
            resolved.append(index % num_layers)
        if len(set(resolved)) != len(resolved):
            _fail("layers", f"{self.layers} names a layer twice", "list each layer once")
        return sorted(resolved)

    def check_activation_checkpointing(self) -> None:
        """Activation checkpointing recomputes each layer's forward in its backward, where an adapter routes again
        from its own layer's hidden states: rows pre-retrieved from an earlier layer's cannot be chosen again."""
        if self.prefetch_layers:
            _fail(
                "prefetch_layers",
                f"{self.prefetch_layers} pre-retrieves rows from an earlier layer's hidden states, which activation "
                "checkpointing's recomputed forward cannot repeat",
                "set prefetch_layers=0, or turn activation checkpointing off",
            )

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        self.store = StoreConfig.from_dict(self.store)
        _check_int("num_neurons", self.num_neurons, 1)
        _check_int("top_k", self.top_k, 1)
        _check_int("n_probe", self.n_probe, 1)
        _check_int("seed", self.seed, 0)
        _check_int("prefetch_layers", self.prefetch_layers, 0)
        _check_int("max_nonfinite_steps", self.max_nonfinite_steps, 1)
        _check_int("update_rows", self.update_rows, 0)
        _check_float("cache_mb", self.cache_mb, 0.0, strict=False)
        r, k = self.num_neurons, self.top_k
        if k > r:
            _fail("top_k", f"{k} is larger than num_neurons = {r}", f"set top_k <= {r} (the paper uses 64)")
        if self.num_experts is None:
            self.num_experts = default_num_experts(r, k, self.n_probe)
        _check_int("num_experts", self.num_experts, 1)
        e = self.num_experts
        if r % e:
            nearby = sorted(divisors(r), key=lambda d: abs(d - e))[:3]
            _fail(
                "num_experts",
                f"{e} does not divide num_neurons = {r} (experts are equal blocks of contiguous neurons)",
                f"use a divisor of {r} such as {', '.join(map(str, sorted(nearby)))}, or null for the default",
            )
        if self.n_probe > e:
            _fail("n_probe", f"{self.n_probe} is larger than num_experts = {e}", f"set n_probe <= {e}")
        pool = self.n_probe * (r // e)
        if pool < k:
            _fail(
                "top_k",
                f"{k} exceeds the probed pool, n_probe ({self.n_probe}) x neurons per expert ({r // e}) = {pool}",
                "lower top_k, raise n_probe, or use fewer (larger) experts",
            )
        if not isinstance(self.gate, str) or self.gate not in GATE_MODES:
            _fail("gate", f"unknown gate mode {self.gate!r}", f"use one of {', '.join(map(repr, GATE_MODES))}")
        if self.layers is not None:
            if not isinstance(self.layers, (list, tuple)) or not self.layers:
                _fail(
                    "layers",
                    f"expected a non-empty list of layer indices or null, got {self.layers!r}",
                    "write e.g. [0, 1, 2] or null for every layer",
                )
            for index in self.layers:
                if isinstance(index, bool) or not isinstance(index, int):
                    _fail("layers", f"layer index {index!r} is not an integer", "list integer layer indices")
            self.layers = list(self.layers)
        _check_float("key_init_std", self.key_init_std, 0.0, strict=True)
        _check_float("router_init_scale", self.router_init_scale, 0.0, strict=False)
        if not isinstance(self.row_dtype, str) or self.row_dtype not in ROW_DTYPES:
            _fail("row_dtype", f"unknown dtype {self.row_dtype!r}", f"use one of {', '.join(map(repr, ROW_DTYPES))}")
        self._validate_optimizer()

    def _validate_optimizer(self) -> None:
        if not isinstance(self.clip_rows, str) or self.clip_rows not in CLIP_ROWS:
            _fail("clip_rows", f"unknown mode {self.clip_rows!r}", f"use one of {', '.join(map(repr, CLIP_ROWS))}")
        if not isinstance(self.bias_correction, str) or self.bias_correction not in BIAS_CORRECTIONS:
            _fail(
                "bias_correction",
                f"unknown mode {self.bias_correction!r}",
                f"use one of {', '.join(map(repr, BIAS_CORRECTIONS))}",
            )
        if self.bias_correction == "per_row" and self.store.device == "nvme":
            _fail(
                "bias_correction",
                "'per_row' is not supported with the NVMe store yet (its per-row step counts are not on NVMe)",
                "use 'global' with store.device='nvme', or the CPU store",
            )
        if self.lr is not None:
            _check_float("lr", self.lr, 0.0, strict=False)
        if self.eps is not None:
            _check_float("eps", self.eps, 0.0, strict=True)
        if self.weight_decay is not None:
            _check_float("weight_decay", self.weight_decay, 0.0, strict=False)
        if self.betas is not None:
            betas = self.betas
            if not isinstance(betas, (list, tuple)) or len(betas) != 2:
                _fail("betas", f"expected two numbers [beta1, beta2], got {betas!r}", "write e.g. [0.9, 0.999]")
            for i, beta in enumerate(betas):
                _check_float(f"betas[{i}]", beta, 0.0, strict=False)
                if beta >= 1.0:
                    _fail(f"betas[{i}]", f"must be < 1, got {beta}", "use a value in [0, 1), e.g. 0.9 or 0.999")
            self.betas = (float(betas[0]), float(betas[1]))
