"""Memory plan of a meft_ds run: the bytes each tier holds (device, pinned host, host, NVMe), item by item, and a
verdict on whether it fits a device of a given size, with computed changes that would make it fit.

The base model is instantiated on the meta device (no weights, no memory) to count its parameters exactly and to
measure what its training forward keeps for backward (:mod:`meft_ds.model_facts`). Everything else is arithmetic that
mirrors the code: the fetched rows and ``(T, |U|)`` tensors the masked adapter path keeps for backward, the pinned
staging buffers (rings shared by the adapters, grown to powers of two), the device row cache, the routers and their
optimizer where the ZeRO config puts them, DeepSpeed's gradient bucket, and the row stores
(:func:`meft_ds.memory.store_bytes`). Plans are for an accelerator: the adapter's masked path, not the CPU's top-K
kernel. ``|U|``, the rows a micro-batch fetches per layer, is estimated as if every token chose its K rows uniformly
at random; routing concentrates on fewer rows (about half as many on SmolLM2), so this is an upper estimate, and a
union measured on the task's data can be given instead.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from meft_ds.activations import meta_model
from meft_ds.config import MeftConfig, MeftConfigError, merge_settings
from meft_ds.ds_config import AUTO, load_deepspeed_config, section
from meft_ds.inject import text_config
from meft_ds.memory import HEADROOM, store_bytes
from meft_ds.model_facts import ModelFacts, load_model_config, model_facts
from meft_ds.pinned import RINGS
from meft_ds.transfer import narrowest_index_dtype

GiB = 2**30
TIERS = ("device", "pinned", "host", "nvme")
# What a device of N GiB leaves to the tensors planned here: the CUDA context, cuBLAS/cuDNN workspaces and NCCL's
# buffers take 0.5-1 GiB outside them, and on long runs PyTorch's caching allocator reserves 5-10% more than it
# hands out (split blocks, fragmentation). 1 GiB plus 8% of the device, i.e. 2.9 GiB of a 24 GiB card.
CONTEXT_RESERVE = 1 * GiB
FRAGMENTATION = 0.08
TIGHT = 0.95  # a plan using more of the budget than this fits narrowly: the verdict lists what would free memory
DEFAULT_BUCKET = 500_000_000  # DeepSpeed's default zero_optimization.reduce_bucket_size (elements)


# ---------------------------------------------------------------------------------------------- the arithmetic
@dataclass(frozen=True)
class Item:
    tier: str  # one of TIERS
    name: str
    nbytes: int
    note: str = ""
    training: bool = False  # training state (see :func:`training_items`), not the base model or its activations


@dataclass(frozen=True)
class Setup:
    """What the byte counts depend on besides the model: the meft settings, the shape, DeepSpeed's settings."""

    meft: MeftConfig
    batch_size: int
    seq_len: int
    compute: torch.dtype = torch.float32
    zero_stage: int = 0
    offload: str = "none"  # where ZeRO-Offload puts the routers' optimizer states: none, cpu, nvme
    pin_offload: bool = False
    bucket: int = 0  # elements of DeepSpeed's gradient bucket (0: none)
    overlap_comm: bool = False  # ZeRO-1/2: a second bucket
    zero3_linear: bool = False  # ZeRO-3's memory-efficient linear: every linear keeps its input (activations.linear_of)
    world_size: int = 1
    checkpointing: bool = False
    union_fraction: float = 1.0  # a measured union over the uniform estimate at the same shape (1: the estimate)

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def union(self) -> int:
        """``|U|``, rows fetched per layer and micro-step: :func:`expected_union`, times ``union_fraction``."""
        estimate = expected_union(self.meft.num_neurons, self.meft.top_k, self.tokens)
        return max(1, min(self.meft.num_neurons, math.ceil(self.union_fraction * estimate)))

    @property
    def rows(self) -> torch.dtype:
        return self.meft.row_torch_dtype(self.compute)


def setup_from_ds_config(ds: dict[str, Any], meft: MeftConfig, *, dim: int, **shape: Any) -> Setup:
    """Dtype and ZeRO settings of a DeepSpeed config. ``"auto"`` bf16/fp16 counts as enabled (plans are for the
    target accelerator); an ``"auto"`` reduce_bucket_size is ``dim**2``, as the HF integration fills it in."""
    enabled = [key for key in ("bf16", "fp16") if section(ds, key).get("enabled") in (True, AUTO)]
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}[enabled[0]] if enabled else torch.float32
    zero = section(ds, "zero_optimization")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise MeftConfigError(f"zero_optimization.stage: {stage!r} is not a ZeRO stage. Fix: use 0, 1, 2 or 3.")
    offload, overlap = section(zero, "offload_optimizer"), zero.get("overlap_comm", AUTO)
    bucket = zero.get("reduce_bucket_size", DEFAULT_BUCKET)
    contiguous = stage > 0 and zero.get("contiguous_gradients", True) is not False  # DeepSpeed's bucket, stages 1-3
    return Setup(
        meft, compute=compute, zero_stage=stage, offload=str(offload.get("device", "none")),
        pin_offload=offload.get("pin_memory") is True, overlap_comm=stage == 3 if overlap == AUTO else bool(overlap),
        bucket=int(dim**2 if bucket == AUTO else bucket) if contiguous else 0,
        zero3_linear=stage == 3 and zero.get("memory_efficient_linear", True) is not False, **shape,
    )  # fmt: skip


def expected_union(num_rows: int, top_k: int, tokens: int) -> int:
    """``E|U| = r (1 - (1 - K/r)^T)``, rounded up: the union when each token picks K distinct rows uniformly (a
    little above ``T*K`` draws with replacement; at most ``min(r, T*K)``). Routing concentrates: real unions are
    smaller, so this is an upper estimate."""
    return min(num_rows, math.ceil(num_rows * (1.0 - (1.0 - top_k / num_rows) ** tokens)))


def with_union(setup: Setup, union: float) -> Setup:
    """``setup`` with a measured ``|U|`` (rows a micro-step fetches per layer) in place of the uniform estimate."""
    estimate = expected_union(setup.meft.num_neurons, setup.meft.top_k, setup.tokens)
    return dataclasses.replace(setup, union_fraction=union / estimate)


def pinned_capacity(numel: int) -> int:
    """Elements of a staging buffer grown to hold ``numel``: the next power of two (``PinnedBuffers.take``)."""
    return 1 << max(numel - 1, 0).bit_length()


def cache_rows(s: Setup, adapters: int, dim: int) -> int:
    """Rows each adapter's device cache holds: its share of ``cache_mb``, a row costing ``2d`` values in the row
    dtype and ``2d`` fp32 gradient accumulators (``RowTransfer._cache_for``)."""
    per_row = 2 * dim * (s.rows.itemsize + 4)
    return min(int(s.meft.cache_mb * 2**20) // adapters // per_row, s.meft.num_neurons)


def staging_buffers(s: Setup, dim: int, union: int, cached: int) -> dict[str, int]:
    """Bytes of one ring slot of each ring of pinned staging buffers, by the purposes ``RowTransfer`` takes them for
    (the rings are shared by all adapters of a model: :data:`meft_ds.pinned.RINGS` ring slots each)."""
    m, t, rb = s.meft, s.tokens, s.rows.itemsize
    sizes = {
        "rows": pinned_capacity(union * 2 * dim) * rb,
        "hidden": pinned_capacity(t * dim) * rb,
        "probe_ids": pinned_capacity(t * m.n_probe) * narrowest_index_dtype(m.num_experts).itemsize,
        # index tensors, the largest each token's K positions in the union (bytes)
        "indices": pinned_capacity(t * m.top_k * narrowest_index_dtype(union).itemsize),
    }
    uncached = union - min(union, cached)  # cached rows' gradients accumulate in the device cache instead
    if uncached:  # gradients and their has-a-gradient flags
        sizes["grads"] = pinned_capacity(uncached * 2 * dim) * rb + pinned_capacity(uncached)
    if m.gated:
        sizes["probe_gates"] = pinned_capacity(t * m.n_probe) * rb
    if cached:  # the cache's accumulated gradients, flushed at the optimizer boundary (fp16 ones travel in fp32)
        sizes["cached"] = pinned_capacity(cached * 2 * dim) * (4 if s.rows == torch.float16 else rb)
        sizes["cached"] += pinned_capacity(cached)
    return sizes


def masked_path_bytes(s: Setup, union: int) -> int:
    """What :class:`meft_ds.adapter.MaskedAdapterFunction` keeps per layer besides the rows: ``(T, |U|)`` scores and
    gates (compute dtype) and the active mask (bool), and the gate's ``(|U|,)`` int64 index."""
    c = s.compute.itemsize
    return s.tokens * union * (2 * c + 1) + union * 8 if s.meft.gated else s.tokens * union * (c + 1)


def dense_trainable_items(label: str, numel: int, s: Setup, largest: int) -> list[Item]:
    """Where DeepSpeed keeps ``numel`` trainable dense parameters (MEFT's routers; LoRA's matrices, a dense adapter's
    or every weight of the model for the baselines), ``largest`` of them in the largest tensor: weights and gradients
    on the device, the optimizer states on the device or, under ZeRO-Offload, in CPU memory or on NVMe, and
    DeepSpeed's gradient bucket.

    Gradients: ZeRO-2 and ZeRO-3 keep a gradient partition on the device (``numel / world``), except under
    ZeRO-Offload, where each gradient is copied into the bucket as autograd makes it and leaves for the CPU's
    partition when the bucket is reduced (``DeepSpeedZeroOptimizer.copy_grads_in_partition``, ZeRO-3's
    ``partition_grads`` into its ``grad_partitions_flat_buffer`` on the CPU; ``param.grad`` is None after the
    backward): only one tensor's gradient is ever outside the bucket. ZeRO-1 and no ZeRO keep every gradient until
    the boundary. ZeRO-1/2's offload also keeps a device buffer of the largest tensor's size, through which gradients
    accumulate on the CPU (``temp_grad_buffer_for_gpu_offload``; ZeRO-3 has none). ZeRO-1/2 with ``overlap_comm``
    keep two buckets, ZeRO-3 one whatever it says. ZeRO-3 partitions the weights too; they are counted whole (exact
    on one rank; beyond, tensors under ``stage3_param_persistence_threshold`` stay whole on every rank)."""
    c, world = s.compute.itemsize, s.world_size
    offloading = s.offload != "none" and s.zero_stage > 0
    if offloading and s.zero_stage > 1:
        grads, note = largest * c, "the largest tensor's; the others go through the bucket"
    else:
        grads, note = numel * c // (world if s.zero_stage > 1 else 1), ""
    items = [
        Item("device", f"{label}: weights", numel * c, training=True),
        Item("device", f"{label}: gradients", grads, note, training=True),
    ]
    if offloading and s.zero_stage < 3:
        items.append(Item("device", "ZeRO-Offload gradient buffer", largest * c, "the largest tensor's", training=True))
    if s.offload == "none":  # fp32 master unless computing in fp32 (stage 0: + fp32 grads), two Adam moments
        state = numel * (8 + (0 if c == 4 else 8 if s.zero_stage == 0 else 4))
        items.append(
            Item("device", f"{label}: optimizer states", state // (world if s.zero_stage else 1), training=True)
        )
    else:
        tier = "nvme" if s.offload == "nvme" else "pinned" if s.pin_offload else "host"
        items.append(Item(tier, f"{label}: ZeRO-Offload fp32 master, grads, moments", numel * 16 // world))
    if s.bucket and numel:
        bucket = s.bucket * c * (1 + (s.overlap_comm and s.zero_stage < 3))
        items.append(Item("device", "ZeRO gradient bucket", bucket, f"{s.bucket:,} elements", training=True))
    return items


def training_items(s: Setup, *, adapters: int, dim: int) -> list[Item]:
    """MEFT's training state: the routers (as DeepSpeed keeps them), the rows fetched and kept for backward (one
    layer's with activation checkpointing, ``s.checkpointing``), the pre-retrieved rows in flight and the device row
    cache. The device items of these are the run's *device-resident training bytes*, which ``launch/train.py``
    reports for every ``--method``."""
    m, union, rb = s.meft, s.union, s.rows.itemsize
    row_bytes = union * 2 * dim * rb
    items = [
        Item("device", "fetched rows kept for backward", (1 if s.checkpointing else adapters) * row_bytes,
             f"|U| = {union} rows per layer", training=True),
        *dense_trainable_items("routers", adapters * m.num_experts * dim, s, largest=m.num_experts * dim),
    ]  # fmt: skip
    if m.prefetch_layers:
        items.append(Item("device", "pre-retrieved rows in flight", row_bytes, training=True))
    cached = cache_rows(s, adapters, dim) if m.cache_mb else 0
    if cached:
        cache = adapters * cached * (2 * dim * (rb + 4) + 1)
        items.append(Item("device", "device row cache", cache, f"{cached} rows", training=True))
    return items


def device_training_bytes(items: list[Item]) -> int:
    """The device bytes of the training-state items (not the frozen base model, its activations or working set)."""
    return sum(item.nbytes for item in items if item.training and item.tier == "device")


def plan_items(s: Setup, model: ModelFacts) -> list[Item]:
    """Every item of the plan, from the setup and the model's facts."""
    m, d, c, t, layers, world = s.meft, model.dim, s.compute.itemsize, s.tokens, model.adapters, s.world_size
    union = s.union
    row_bytes, masked = union * 2 * d * s.rows.itemsize, masked_path_bytes(s, union)
    kept = 1 if s.checkpointing else layers  # checkpointed, a layer's adapter is recomputed in its own backward
    saved, working = model.saved, 0
    activations = saved.total
    if s.checkpointing:  # layer inputs stay; one layer's activations come back during its backward
        activations = saved.outside + model.num_layers * t * d * c
        working = max(saved.per_layer) + row_bytes + masked
    # one step of backward at a time: the adapter's (4 (T,|U|) temporaries, key and value grads, stacked) or the loss's
    working += max(4 * t * union * c + 2 * union * 2 * d * c, t * model.vocab * (8 + c))
    cached = cache_rows(s, layers, d) if m.cache_mb else 0
    base = model.base_bytes // (world if s.zero_stage == 3 else 1)
    items = [
        Item("device", f"frozen base model ({str(s.compute)[6:]})", base, f"{model.params / 1e9:.2f}B parameters"),
        Item("device", "activations saved for backward" + " (checkpointed)" * s.checkpointing, activations,
             "measured on meta" if model.measured else "analytic: the model did not run on meta"),
        Item("device", "masked path: (T, |U|) scores, gates, masks", kept * masked),
        Item("device", "backward working set", working, "largest single step"),
        *training_items(s, adapters=layers, dim=d),
    ]  # fmt: skip
    staging = staging_buffers(s, d, union, cached)
    rings = ", ".join(f"{RINGS[name]} x {name}" for name in staging)
    staged = sum(RINGS[name] * size for name, size in staging.items())
    items.append(Item("pinned", "staging buffers, rings shared by the adapters", staged, rings))
    shards = world if m.store.shard else 1
    full = store_bytes(layers, m.num_neurons, d) // shards  # rows, two moments, a full-size accumulator
    if m.store.device == "nvme":  # full / 8: one r x d fp32 tensor per layer
        keys, layer = full // 8, full // 8 // layers
        items += [
            Item("nvme", "row stores: fp32 values + 2 Adam moments", full * 5 // 8, "the keys stay in RAM"),
            Item("host", "NVMe tier: keys (routing reads them)", keys),
            Item("pinned", "NVMe tier: read areas", max(0, int(m.store.ram_budget_mb * 2**20) - keys),
                 "ram_budget_mb less the keys: the forward's reads"),
            Item("pinned", "NVMe tier: optimizer-step buffers", 2 * 5 * layer,
                 "values + 2 moments of two layers (one read ahead), worst case: every row touched"),
            Item("host", "NVMe tier: optimizer-step rows", 2 * layer, "one layer at a time"),
        ]  # fmt: skip
    else:
        items.append(Item("host", "row stores: fp32 rows + 2 Adam moments", full * 3 // 4))
    return [
        *items,
        Item("host", "row gradient accumulators", full // 4, "worst case: every row touched"),
        Item("host", "row gradient hand-over", (union + m.num_neurons // shards) * 2 * d * 4, "one layer at a time"),
        Item("host", "routing scores", t * (d + m.n_probe * m.expert_size) * 4, "one layer at a time"),
    ]


# ---------------------------------------------------------------------------------------------- the plan
@dataclass
class Verdict:
    device_fits: bool
    need: int  # device bytes
    budget: int  # device bytes left to the planned tensors
    changes: list[str] = field(default_factory=list)  # computed: a device change, and the device bytes it leads to
    host_need: int = 0  # pinned and pageable CPU bytes
    host_budget: int | None = None  # CPU bytes usable by the run, when a CPU memory size was given

    @property
    def host_fits(self) -> bool:
        return self.host_budget is None or self.host_need <= self.host_budget

    @property
    def fits(self) -> bool:
        return self.device_fits and self.host_fits


@dataclass
class MemoryPlan:
    """Bytes per tier of one configuration, itemised; :meth:`verdict` says whether it fits a device."""

    setup: Setup
    model: ModelFacts
    items: list[Item]
    remeasure: Callable[[int], ModelFacts] = field(repr=False)  # the model's facts at another micro-batch size

    @property
    def union(self) -> int:
        return self.setup.union

    def total(self, tier: str) -> int:
        return sum(item.nbytes for item in self.items if item.tier == tier)

    def bytes_of(self, prefix: str) -> int:
        """Bytes of the items whose name starts with ``prefix``."""
        return sum(item.nbytes for item in self.items if item.name.startswith(prefix))

    def _device(self, setup: Setup, model: ModelFacts | None = None) -> int:
        return sum(item.nbytes for item in plan_items(setup, model or self.model) if item.tier == "device")

    def verdict(self, device_gib: float = 24.0, host_gib: float | None = None) -> Verdict:
        """Whether the device tier fits ``device_gib`` GiB less :data:`CONTEXT_RESERVE` and :data:`FRAGMENTATION`
        (and CPU memory ``host_gib`` x ``meft_ds.memory.HEADROOM``, if given); if not, what to change."""
        budget = int(device_gib * GiB * (1 - FRAGMENTATION)) - CONTEXT_RESERVE
        need = self.total("device")
        host_budget = None if host_gib is None else int(host_gib * GiB * HEADROOM)
        verdict = Verdict(need <= budget, need, budget, host_need=self.total("pinned") + self.total("host"),
                          host_budget=host_budget)  # fmt: skip
        if not verdict.device_fits:
            verdict.changes += self._device_changes(budget, shrink=True)
        elif verdict.need > TIGHT * budget:  # it fits, narrowly: what frees memory without shrinking the run
            verdict.changes += self._device_changes(budget, shrink=False)
        return verdict

    def _device_changes(self, budget: int, *, shrink: bool) -> list[str]:
        """Single changes, each with the device bytes it leads to; with ``shrink``, also the largest micro-batch and
        num_neurons that fit."""
        s, changes = self.setup, []

        def add(text: str, setup: Setup, model: ModelFacts | None = None) -> None:
            need = self._device(setup, model)
            changes.append(f"{text}: device {need / GiB:.2f} GiB ({'fits' if need <= budget else 'not enough alone'})")

        replace = dataclasses.replace
        if not s.checkpointing:
            text = (
                "enable activation checkpointing (launch/train.py --activation_checkpointing, or "
                "model.gradient_checkpointing_enable(); rows then travel twice)"
            )
            if s.meft.prefetch_layers:  # pre-retrieval does not combine with it
                add(f"{text} with meft.prefetch_layers=0", replace(s, checkpointing=True, meft=_changed(s.meft,
                    prefetch_layers=0)))  # fmt: skip
            else:
                add(text, replace(s, checkpointing=True))
        routers = self.model.adapters * s.meft.num_experts * self.model.dim
        if s.bucket > 2 * routers > 0:  # a bucket about the routers' size already saves what it can
            add(f"set zero_optimization.reduce_bucket_size={routers} (the routers' size)", replace(s, bucket=routers))
        if s.meft.cache_mb:
            add("set meft.cache_mb=0", replace(s, meft=_changed(s.meft, cache_mb=0.0)))
        for batch in range(s.batch_size - 1, 0, -1) if shrink else ():
            facts = self.remeasure(batch)
            if self._device(replace(s, batch_size=batch), facts) <= budget:
                text = f"use --micro_batch_size {batch} and {math.ceil(s.batch_size / batch)}x gradient accumulation"
                add(text, replace(s, batch_size=batch), facts)
                break
        k, r = s.meft.top_k, s.meft.num_neurons
        for neurons in range(r - k - (r % k), 0, -k) if shrink else ():
            smaller = replace(s, meft=_changed(s.meft, num_neurons=neurons, num_experts=None))
            if self._device(smaller) <= budget:
                add(f"set meft.num_neurons={neurons}", smaller)
                break
        return changes


def _changed(meft: MeftConfig, **changes: Any) -> MeftConfig:
    return MeftConfig.from_dict({**meft.to_dict(), **changes})


def plan(
    model: Any, ds_config: str | Path | dict[str, Any], *, batch_size: int, seq_len: int, world_size: int = 1,
    meft: dict[str, Any] | None = None, activation_checkpointing: bool = False, union: int | None = None,
) -> MemoryPlan:  # fmt: skip
    """The memory plan of training ``model`` (a ``PretrainedConfig`` or anything :func:`load_model_config` takes)
    under ``ds_config`` (its ``"meft"`` section updated by ``meft``), ``batch_size x seq_len`` tokens per rank.
    ``union``: rows a micro-step fetches per layer, measured on the task's data (``rows_fetched`` per adapter and
    micro-step), in place of the uniform-routing upper estimate; changes the plan proposes scale it alike."""
    ds = load_deepspeed_config(ds_config)
    meft_config = MeftConfig.from_dict(merge_settings(section(ds, "meft"), meft or {}))
    if activation_checkpointing:
        meft_config.check_activation_checkpointing()
    config = load_model_config(model)
    setup = setup_from_ds_config(
        ds, meft_config, dim=text_config(config).hidden_size, batch_size=batch_size, seq_len=seq_len,
        world_size=world_size, checkpointing=activation_checkpointing,
    )  # fmt: skip
    if union is not None:
        if union < 1:
            raise MeftConfigError(f"--union {union}: must be at least 1 row. Fix: pass rows fetched per layer.")
        setup = with_union(setup, union)
    on_meta = meta_model(config, setup.compute)
    name = model if isinstance(model, str) else ""

    def remeasure(batch: int) -> ModelFacts:
        return model_facts(on_meta, meft_config, batch, seq_len, name, zero3_linear=setup.zero3_linear)

    facts = remeasure(batch_size)
    return MemoryPlan(setup, facts, plan_items(setup, facts), remeasure)
