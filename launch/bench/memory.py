"""d. Adapter bytes resident on the device as r grows, at fixed K: MEFT (measured) vs a dense adapter (analytic).

MEFT keeps on the device its router (``E x d``), what it copies there for one micro-batch (the union ``U`` of the
selected rows, ``|U| x 2 x d`` in the travel dtype, and the per-token ``union_pos``), which autograd holds from the
forward until the backward, and the cache budget if one is configured. Measured on one adapter layer of the real model
with real text: ``bytes_to_device`` of ``meft_ds.stats`` during one forward (everything copied to the device for that
micro-batch; a little of it, the expert index of each row, is freed before the backward, so this is an upper bound),
plus the router's parameter bytes, plus the cache's allocated bytes (``transfer.device_bytes``). The forward runs
under ``torch.no_grad()`` to save time: the copies are the same. A model with ``L``
adapter layers holds ``L`` times the per-layer fetch at the end of its forward.
"""

from __future__ import annotations

from typing import Any

import torch

import meft_ds
from bench.common import (
    GB,
    MB,
    Context,
    Section,
    figure_footer,
    fits_in_memory,
    fmt_bytes,
    fmt_ratio,
    free_memory,
    meft_settings,
)
from bench.traffic import device_cache_bytes, stats_delta

OFFLOADED_BYTES = 4  # ZeRO-Offload: bf16 weights + bf16 gradients on the device, Adam state on the host
ON_DEVICE_BYTES = 16  # Adam on the device, mixed precision: bf16 weights + grads, fp32 master, exp_avg, exp_avg_sq


def fetch_bound(tokens: int, top_k: int, dim: int, row_bytes: int = 2) -> int:
    """The most one micro-batch can fetch whatever r: every token's K rows distinct (key and value, ``row_bytes``
    each element), with a position in ``U`` per token and row and an expert index per row (int64)."""
    rows = tokens * top_k
    return rows * 2 * dim * row_bytes + rows * 8 + rows * 8


def meft_device_bytes(context: Context, neurons: int) -> dict[str, Any]:
    """One forward of one micro-batch through a model with one MEFT layer of ``neurons`` rows; its device bytes."""
    s = context.settings
    base = {"num_neurons": neurons, "top_k": s.top_k, "row_dtype": "bf16", "layers": [s.memory_layer]}
    config = meft_settings(base, context.overrides, {})
    assert config is not None  # no variant keys of its own, so never skipped
    model = meft_ds.inject(context.fresh_model(), config)
    (adapter,) = meft_ds.adapters(model)
    router = adapter.router.weight
    before = meft_ds.stats(model)
    with torch.no_grad():  # the same copies as with autograd on (which would hold them until the backward), faster
        model(**context.batch(0))
    fetched = stats_delta(before, meft_ds.stats(model))
    result = {
        "neurons": neurons,
        "experts": config.num_experts,
        "router": router.numel() * router.element_size(),
        "fetched": fetched["bytes_to_device"],
        "rows": fetched["rows_fetched"],
        "row_bytes": fetched["row_bytes_to_device"],
        "cache": device_cache_bytes(model),
        "dim": adapter.dim,
    }
    result["meft"] = result["router"] + result["fetched"] + result["cache"]
    del model, adapter, router
    free_memory()
    return result


def run(context: Context) -> Section:
    s = context.settings
    tokens = s.micro_batch * s.seq_len
    measured, skipped = [], []
    config = context.base().config
    for neurons in s.memory_neurons:
        store = 4 * 2 * neurons * config.hidden_size * 4  # rows, two moments, at worst a full accumulator (fp32)
        if not fits_in_memory(store + GB, f"r={neurons}", skipped):
            continue
        result = meft_device_bytes(context, neurons)
        dim = result["dim"]
        result["dense_offloaded"] = OFFLOADED_BYTES * 2 * neurons * dim
        result["dense_on_device"] = ON_DEVICE_BYTES * 2 * neurons * dim
        measured.append(result)
        print(f"  r={neurons}: |U|={result['rows']} rows, MEFT {fmt_bytes(result['meft'])}")
    dim = measured[0]["dim"]
    bound = fetch_bound(tokens, s.top_k, dim)
    table = [
        [
            m["neurons"], m["experts"], m["rows"], fmt_bytes(m["router"]), fmt_bytes(m["fetched"]),
            fmt_bytes(m["cache"]), fmt_bytes(m["meft"]), fmt_bytes(m["dense_offloaded"]),
            fmt_bytes(m["dense_on_device"]), fmt_ratio(m["dense_offloaded"] / m["meft"]),
        ]
        for m in measured
    ]  # fmt: skip
    first, last = measured[0], measured[-1]
    meft_growth = last["meft"] / first["meft"]
    dense_growth = last["dense_offloaded"] / first["dense_offloaded"]
    flat = all(m["fetched"] <= bound for m in measured)
    return Section(
        key="d",
        title="Adapter bytes resident on the device vs r (per layer, fixed K)",
        what=(
            f"Device bytes of one adapter layer (layer {s.memory_layer} of SmolLM2-135M, d={dim}) during the forward "
            f"and backward of one micro-batch of {s.micro_batch} x {s.seq_len} real tokens, K={s.top_k}, as r grows "
            f"from {first['neurons']} to {last['neurons']}: MEFT (rows travel in bf16) vs a dense parallel adapter "
            "(2 r d elements per layer) with its Adam state offloaded (ZeRO-Offload: bf16 weights + bf16 gradients on "
            "the device, 4 bytes per element) or on the device (bf16 weights + gradients, fp32 master, exp_avg, "
            "exp_avg_sq: 16 bytes per element)."
        ),
        how=(
            "MEFT: measured. meft_ds.stats(model)['bytes_to_device'] during one forward = everything meft_ds copies to "
            "the device for that micro-batch (the union U of selected rows, |U| x 2 x d bf16, and union_pos; "
            "autograd keeps them until the backward), plus the router weight's bytes (E x d, fp32 here), plus the "
            "device cache's allocated bytes (0 unless --meft cache_mb=... is given; the whole budget goes to the one "
            "layer). Dense: analytic, 2 r d x 4 or 16 bytes. The dense adapter also keeps T x r activations for its "
            "backward, not counted."
        ),
        columns=[
            "r",
            "E",
            "|U| rows",
            "router",
            "fetched rows + indices",
            "cache",
            "MEFT total",
            "dense, optimizer offloaded",
            "dense, optimizer on device",
            "dense (offloaded) ÷ MEFT",
        ],
        rows=table,
        target=(
            f"MEFT stays flat: bounded by the micro-batch (T K = {tokens * s.top_k} rows and their indices, "
            f"{fmt_bytes(bound)} with bf16 rows) "
            "whatever r, while the dense adapter grows linearly"
        ),
        met=flat,
        verdict=(
            f"From r={first['neurons']} to r={last['neurons']} ({last['neurons'] // first['neurons']}x) MEFT's device "
            f"bytes grow {fmt_ratio(meft_growth)} ({fmt_bytes(first['meft'])} -> {fmt_bytes(last['meft'])}), the dense "
            f"adapter's {fmt_ratio(dense_growth)}; the fetched rows stay within the T K bound "
            f"({fmt_bytes(bound)}): {'yes' if flat else 'no'}. |U| grows with r until r passes the number of rows "
            "the micro-batch's tokens select."
        ),
        notes=skipped,
        data={"measured": measured, "bound": bound, "tokens": tokens},
    )


def plot(section: Section, path: str) -> None:
    import matplotlib.pyplot as plt

    measured = section.data["measured"]
    neurons = [m["neurons"] for m in measured]
    figure, axes = plt.subplots(figsize=(9, 5.5))
    axes.plot(neurons, [m["meft"] / MB for m in measured], "o-", label="MEFT (measured: router + fetched rows + cache)")
    axes.plot(
        neurons, [m["dense_offloaded"] / MB for m in measured], "s--", label="dense, optimizer offloaded (4 B/elem)"
    )
    axes.plot(neurons, [m["dense_on_device"] / MB for m in measured], "^--", label="dense, Adam on device (16 B/elem)")
    axes.axhline(section.data["bound"] / MB, color="gray", linestyle=":", label="bound: T x K rows + indices (bf16)")
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xlabel("r (adapter neurons per layer)")
    axes.set_ylabel("MB on the device, one layer")
    axes.set_title("d. Adapter bytes resident on the device, per layer, K=64, micro-batch 2 x 256")
    axes.legend(fontsize=8)
    figure.subplots_adjust(bottom=0.25)
    figure_footer(figure, section.how, section.command)
    figure.savefig(path, dpi=110)
    plt.close(figure)
