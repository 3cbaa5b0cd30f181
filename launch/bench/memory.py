"""d. Adapter bytes resident on the device as r grows, at fixed K: MEFT (measured) vs a dense adapter (analytic).

MEFT: router + what one micro-batch copies to the device (``meft_ds.stats``; autograd holds it until the backward,
an upper bound since the rows' expert indices are freed earlier) + the cache's allocated bytes, on one adapter layer.
"""

from __future__ import annotations

from typing import Any

import torch

import meft_ds
from bench import common, plots
from bench.common import GB, MB, Context, Section, fits_in_memory, fmt_bytes, fmt_ratio, free_memory, stats_delta
from bench.traffic import device_cache_bytes
from meft_ds.memory import store_bytes

OFFLOADED_BYTES = 2  # ZeRO-2 offload: bf16 weights on the device; gradients pass through the bucket to the host
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
    config = context.meft(base)
    model = meft_ds.inject(context.fresh_model(), config)
    (adapter,) = meft_ds.adapters(model)
    before = meft_ds.stats(model)
    with torch.no_grad():  # the same copies as with autograd on (which would hold them until the backward), faster
        model(**context.batch(0))
    fetched = stats_delta(before, meft_ds.stats(model))
    result = {
        "neurons": neurons,
        "experts": config.num_experts,
        "router": adapter.router.weight.numel() * adapter.router.weight.element_size(),
        "fetched": fetched["bytes_to_device"],
        "rows": fetched["rows_fetched"],
        "row_bytes": fetched["row_bytes_to_device"],
        "cache": device_cache_bytes(model),
        "dim": adapter.dim,
    }
    result["meft"] = result["router"] + result["fetched"] + result["cache"]
    result["dense_offloaded"] = OFFLOADED_BYTES * 2 * neurons * adapter.dim
    result["dense_on_device"] = ON_DEVICE_BYTES * 2 * neurons * adapter.dim
    del model, adapter
    free_memory()
    return result


def run(context: Context) -> Section:
    s = context.settings
    tokens = s.micro_batch * s.seq_len
    measured, skipped = [], []
    config = context.base().config
    for neurons in s.memory_neurons:
        if not fits_in_memory(store_bytes(1, neurons, config.hidden_size) + GB, f"r={neurons}", skipped):
            continue
        measured.append(meft_device_bytes(context, neurons))
        print(f"  r={neurons}: |U|={measured[-1]['rows']} rows, MEFT {fmt_bytes(measured[-1]['meft'])}")
    first, last = measured[0], measured[-1]
    bound = fetch_bound(tokens, s.top_k, first["dim"])
    table = [
        [m["neurons"], m["experts"], m["rows"],
         *map(fmt_bytes, (m[k] for k in ("router", "fetched", "cache", "meft", "dense_offloaded", "dense_on_device"))),
         fmt_ratio(m["dense_offloaded"] / m["meft"])]
        for m in measured
    ]  # fmt: skip
    flat = all(m["fetched"] <= bound for m in measured)
    values = {"s": s, "dim": first["dim"], "first": first, "last": last, "rows": tokens * s.top_k, "bound": bound}
    values |= {"growth": last["neurons"] // first["neurons"], "meft_growth": last["meft"] / first["meft"]}
    values |= {"dense_growth": last["dense_offloaded"] / first["dense_offloaded"], "flat": "yes" if flat else "no"}
    return common.section("d", values, rows=table, met=flat, notes=skipped, data={"measured": measured, "bound": bound})


def plot(section: Section, path: str) -> None:
    measured = section.data["measured"]
    title = "d. Adapter bytes resident on the device, per layer, K=64, micro-batch 2 x 256"
    labels = {"xlabel": "r (adapter neurons per layer)", "ylabel": "MB on the device, one layer"}
    with plots.chart(section, path, title=title, yscale="log", **labels, legend={"fontsize": 8}) as axes:
        plots.lines(axes, [m["neurons"] for m in measured], [
            ([m["meft"] / MB for m in measured], "o-", "MEFT (measured: router + fetched rows + cache)"),
            ([m["dense_offloaded"] / MB for m in measured], "s--", "dense, optimizer offloaded (2 B/elem)"),
            ([m["dense_on_device"] / MB for m in measured], "^--", "dense, Adam on device (16 B/elem)"),
        ])  # fmt: skip
        bound = section.data["bound"] / MB
        axes.axhline(bound, color="gray", linestyle=":", label="bound: T x K rows + indices (bf16)")
