"""b. Sparse Adam bandwidth on the touched rows vs DeepSpeed's dense CPU Adam vs a plain memory copy.

GB/s = Adam's useful traffic (7 tensors of the rows it updates) / the median time of one step, for every backend and
the dense kernel alike (a backend's gather/scatter counts as overhead, not traffic); ``copy_`` moves 2 tensors.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

import torch

import meft_ds
from bench import plots
from bench.common import GB, Context, Section, Settings, fmt_ratio, free_memory, median_seconds, section, text
from bench.report import this_cpu

BACKENDS = ("fused", "deepspeed", "torch")


def adam_traffic_bytes(num_rows: int, width: int, element_bytes: int = 4) -> int:
    """Bytes Adam must move to update ``num_rows`` rows of ``width`` elements: 7 tensors' (4 read, 3 written)."""
    return 7 * num_rows * width * element_bytes


def row_adapter(num_rows: int, width: int) -> meft_ds.SparseKeyExpertAdapter:
    """An adapter whose row store holds ``num_rows`` rows of ``width`` = 2*d fp32 values (key and value)."""
    config = meft_ds.MeftConfig(num_neurons=num_rows, top_k=64)
    return meft_ds.SparseKeyExpertAdapter(width // 2, config, 0)


def touched_rows(num_rows: int, fraction: float, seed: int = 0) -> torch.Tensor:
    """A sorted random ``fraction`` of the rows (what a store's accumulator holds at an optimizer boundary)."""
    generator = torch.Generator().manual_seed(seed)
    count = max(1, round(fraction * num_rows))
    return torch.randperm(num_rows, generator=generator)[:count].sort().values


def sparse_step_seconds(adapter: Any, backend: str, fraction: float, repeats: int) -> float:
    """Median time of ``SparseRowAdam.step()`` with ``fraction`` of the rows holding a gradient (put into the store's
    accumulator before each step, untimed: the backward does that during the micro-steps)."""
    optimizer = meft_ds.SparseRowAdam([adapter], lr=1e-4, backend=backend)
    ids = touched_rows(adapter.store.num_rows, fraction)
    grads = torch.randn(ids.numel(), 2, adapter.dim) * 1e-3
    refill = functools.partial(adapter.store.accumulate_grad, ids, grads)
    return median_seconds(optimizer.step, repeats=repeats, setup=refill)[0]


def dense_step_seconds(num_rows: int, width: int, repeats: int) -> float:
    """Median time of ``DeepSpeedCPUAdam.step()`` on one ``num_rows x width`` fp32 parameter."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    param = torch.nn.Parameter(torch.zeros(num_rows, width))
    param.grad = torch.randn(num_rows, width) * 1e-3
    return median_seconds(DeepSpeedCPUAdam([param], lr=1e-4, adamw_mode=True).step, repeats=repeats)[0]


def copy_seconds(num_rows: int, width: int, repeats: int) -> float:
    source, target = torch.randn(num_rows, width), torch.empty(num_rows, width)
    return median_seconds(lambda: target.copy_(source), repeats=repeats)[0]


def run(context: Context) -> Section:
    s = context.settings
    rows, width = s.adam_rows, s.adam_width
    print(f"  dense DeepSpeedCPUAdam on {rows} x {width} fp32, and copy_")
    dense_gbs = adam_traffic_bytes(rows, width) / dense_step_seconds(rows, width, s.adam_repeats) / GB
    copy_gbs = 2 * rows * width * 4 / copy_seconds(rows, width, s.adam_repeats) / GB
    free_memory()
    adapter = row_adapter(rows, width)
    sparse = []
    for fraction, backend in itertools.product(s.adam_fractions, BACKENDS):
        try:
            seconds = sparse_step_seconds(adapter, backend, fraction, s.adam_repeats)
        except RuntimeError as error:  # a backend that cannot be built here
            print(f"  note: backend {backend} skipped: {error}")
            continue
        gbs = adam_traffic_bytes(touched_rows(rows, fraction).numel(), width) / seconds / GB
        sparse.append({"backend": backend, "fraction": fraction, "seconds": seconds, "gbs": gbs})
        print(f"  {backend:9s} {fraction:4.0%} touched: {seconds * 1e3:7.1f} ms, {gbs:5.1f} GB/s")
    del adapter
    free_memory()
    data = {"dense_gbs": dense_gbs, "copy_gbs": copy_gbs, "sparse": sparse, "rows": rows, "width": width}
    return report(s, data | {"cpu": this_cpu()})


def report(s: Settings, data: dict[str, Any]) -> Section:
    """The section of what :func:`run` measured (``data``, as results.json keeps it)."""
    dense, copy = data["dense_gbs"], data["copy_gbs"]
    table = [
        ["dense DeepSpeedCPUAdam.step()", "100%", "", f"{dense:.1f}", "1.00x", fmt_ratio(dense / copy)],
        ["torch.Tensor.copy_ (2 tensors)", "100%", "", f"{copy:.1f}", fmt_ratio(copy / dense), "1.00x"],
    ] + [
        [f"SparseRowAdam {m['backend']}", f"{m['fraction']:.0%}", f"{m['seconds'] * 1e3:.1f}", f"{m['gbs']:.1f}",
         fmt_ratio(m["gbs"] / dense), fmt_ratio(m["gbs"] / copy)]
        for m in data["sparse"]
    ]  # fmt: skip
    fused = [m["gbs"] / dense for m in data["sparse"] if m["backend"] == "fused"]
    values = data | {"s": s, "dim": data["width"] // 2, "store_gb": 3 * data["rows"] * data["width"] * 4 / GB}
    values |= {"threads": torch.get_num_threads(), "fused": ", ".join(map(fmt_ratio, fused))}
    values["fractions"] = ", ".join(f"{f:.0%}" for f in s.adam_fractions)
    unbuilt = {} if fused else {"verdict": text("b", "unbuilt")}  # the fused backend could not be built here
    return section("b", values, rows=table, met=bool(fused) and min(fused) >= 0.9, **unbuilt, data=data)


def plot(section: Section, path: str) -> None:
    data = section.data
    fractions = sorted({m["fraction"] for m in data["sparse"]})
    gbs = {(m["backend"], m["fraction"]): m["gbs"] for m in data["sparse"]}
    title = f"b. Sparse Adam on touched rows, rows of {data['width']} fp32, {data.get('cpu', '?')}"
    with plots.chart(
        section, path, title=title, ylabel="GB/s (Adam: 7 tensors of the touched rows)", legend={"fontsize": 8}
    ) as axes:
        series = {f"SparseRowAdam {b}": [gbs.get((b, f), 0.0) for f in fractions] for b in BACKENDS}
        plots.grouped_bars(axes, [f"{f:.0%} of {data['rows']} rows" for f in fractions], series)
        axes.axhline(data["dense_gbs"], color="black", linestyle="--", label="dense DeepSpeedCPUAdam")
        axes.axhline(0.9 * data["dense_gbs"], color="gray", linestyle=":", label="target: 0.9 x dense")
        axes.axhline(data["copy_gbs"], color="tab:red", linestyle="-.", label="torch copy_")
