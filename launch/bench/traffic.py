"""a. Host<->device bytes per optimizer step: MEFT (measured) vs a dense parallel adapter under ZeRO-Offload (analytic).

Dense side: ``bench/formulas.py`` (DeepSpeed ZeRO-2 CPU offload as coded, and the minimal offload).

MEFT side: ``meft_ds.stats(model)`` counters over real micro-steps and optimizer steps (sections.md says which); the
routers are engine parameters that move like the dense adapter under ZeRO-Offload, so their bytes are added.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import meft_ds
from bench import common, plots
from bench.common import GB, Context, Section, fmt_bytes, fmt_ratio, section, text
from bench.formulas import BF16, FP32, OffloadBytes, dense_adapter_params, minimal_offload_bytes, zero_offload_bytes


def router_params(model: nn.Module) -> int:
    return sum(a.router.weight.numel() for a in meft_ds.adapters(model))


# ----------------------------------------------------------------------------------------------------------------
# measuring MEFT


@dataclass
class Window:
    """The counters of one optimizer step: one delta per micro-step (forward+backward) and one for the step itself
    (where the device cache flushes its gradients)."""

    micro: list[dict[str, int]]
    step: dict[str, int]

    def total(self) -> dict[str, int]:
        total = dict(self.step)
        for delta in self.micro:
            for key, value in delta.items():
                total[key] = total.get(key, 0) + value
        return total

    def micro_mean(self, key: str) -> float:
        return sum(delta[key] for delta in self.micro) / len(self.micro)

    def cached_bytes_at(self, accum_steps: int, max_rows: int) -> OffloadBytes:
        """With the cache, for an optimizer step of ``accum_steps`` >= the window's micro-steps: exact when equal;
        else the window's bytes plus, per extra micro-step, the bytes of the window's last micro-step (a row is
        fetched at most once per optimizer step, so later micro-steps miss no more than earlier ones: an
        over-estimate), plus at the flush the gradients of the rows those extra micro-steps fetched (at most
        ``max_rows`` rows updated in all)."""
        total = self.total()
        extra = accum_steps - len(self.micro)
        if extra < 0:
            raise ValueError(f"measured {len(self.micro)} micro-steps, cannot scale down to {accum_steps}")
        last, flushed = self.micro[-1], self.step["rows_updated"]
        grad_row_bytes = self.step["row_bytes_to_host"] / flushed if flushed else 0.0
        new_rows = min(max_rows, flushed + extra * last["rows_fetched"]) - flushed
        return OffloadBytes(
            total["bytes_to_device"] + extra * last["bytes_to_device"],
            total["bytes_to_host"] + extra * last["bytes_to_host"] + new_rows * grad_row_bytes,
        )

    def plain_bytes_at(self, accum_steps: int) -> OffloadBytes:
        """Without a cache a micro-step's bytes do not depend on the others: ``accum_steps`` times the mean, plus
        the step's own (nothing, without a cache)."""
        return OffloadBytes(
            accum_steps * self.micro_mean("bytes_to_device") + self.step["bytes_to_device"],
            accum_steps * self.micro_mean("bytes_to_host") + self.step["bytes_to_host"],
        )


def measure_window(model: nn.Module, optimizers: list[Any], batches: list[dict[str, torch.Tensor]]) -> Window:
    """One optimizer step accumulated over ``batches``, with the ``meft_ds.stats`` deltas of each part."""
    micro = []
    for batch in batches:
        before = meft_ds.stats(model)
        model(**batch).loss.backward()
        micro.append(common.stats_delta(before, meft_ds.stats(model)))
    before = meft_ds.stats(model)
    common.optimizer_step(optimizers)
    return Window(micro, common.stats_delta(before, meft_ds.stats(model)))


@torch.no_grad()
def fixed_batch_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> float:
    return model(**batch).loss.item()


def device_cache_bytes(model: nn.Module) -> int:
    return sum(a.transfer.device_bytes for a in meft_ds.adapters(model))


# ----------------------------------------------------------------------------------------------------------------
# the experiment


def measure_neurons(context: Context, neurons: int, notes: list[str]) -> dict[str, Any] | None:
    """Both MEFT variants at initialisation and after brief training, for ``neurons`` rows per layer.

    One model at a time holds a row store (they are large): the model without the cache measures, trains (its
    trained adapter is exported with ``meft_ds.save_adapter``) and measures again; then the model with the cache
    measures at initialisation (the same seeded init), loads the trained adapter and measures again."""
    s = context.settings
    base = {"num_neurons": neurons, "top_k": s.top_k, "row_dtype": "bf16"}
    config = context.base().config
    num_layers, dim = config.num_hidden_layers, config.hidden_size
    dense_n = dense_adapter_params(num_layers, neurons, dim)
    cache_mb = context.cache_mb if context.cache_mb is not None else 2 * BF16 * dense_n / 2**20
    # one store (rows, two moments, at worst a full gradient accumulator) + the cache + a model copy and activations
    if not common.fits_in_memory(4 * dense_n * FP32 + cache_mb * 2**20 + 2 * GB, f"r={neurons}", notes):
        return None
    plain = context.meft(base, {"cache_mb": 0})
    result: dict[str, Any] = {"neurons": neurons, "layers": num_layers, "dim": dim, "dense_params": dense_n}
    result |= {"config": plain.to_dict(), "cache_mb": cache_mb}
    windows: dict[str, dict[str, Window]] = {"init": {}, "trained": {}}
    plain_steps, window = s.traffic_plain_micro_steps, s.traffic_window
    with tempfile.TemporaryDirectory(prefix="meft_bench_") as trained_dir:
        print(f"  r={neurons}: MEFT without cache, {plain_steps} micro-steps at init")
        model, optimizers = common.build_meft(context.fresh_model(), plain, s.train_lr)
        result["router_params"] = router_params(model)
        windows["init"]["plain"] = measure_window(model, optimizers, [context.batch(i) for i in range(plain_steps)])
        print(f"  r={neurons}: training {s.train_steps} steps on facts (lr {s.train_lr})")
        result["fixed_batch_loss"] = [fixed_batch_loss(model, context.batch(0))]
        train = common.step_function(model, optimizers, lambda i: context.batch(100 + i))
        result["train_losses"] = [train().item() for _ in range(s.train_steps)]
        result["fixed_batch_loss"].append(fixed_batch_loss(model, context.batch(0)))
        trained_batches = [context.batch(200 + i) for i in range(plain_steps)]
        windows["trained"]["plain"] = measure_window(model, optimizers, trained_batches)
        meft_ds.save_adapter(model, trained_dir)
        del model, optimizers  # the optimizers hold the adapters, hence the row store
        common.free_memory()
        print(f"  r={neurons}: MEFT with a {cache_mb:.0f} MiB cache, one step of {window} micro-steps x2")
        cached = context.meft(base, {"cache_mb": cache_mb})
        model, optimizers = common.build_meft(context.fresh_model(), cached, s.train_lr)
        windows["init"]["cache"] = measure_window(model, optimizers, [context.batch(i) for i in range(window)])
        result["cache_device_bytes"] = device_cache_bytes(model)
        meft_ds.load_adapter(model, trained_dir)
        trained_batches = [context.batch(200 + i) for i in range(window)]
        windows["trained"]["cache"] = measure_window(model, optimizers, trained_batches)
        del model, optimizers
        common.free_memory()
    result["windows"] = {
        phase: {name: dataclasses.asdict(window) for name, window in by_variant.items()}
        for phase, by_variant in windows.items()
    }
    return result


def summarize(result: dict[str, Any], accum_steps: int, window: int) -> list[dict[str, Any]]:
    """Rows of the table for one ``r``: per state, the dense baselines and each MEFT variant measured."""
    dense_n, router_n = result["dense_params"], result["router_params"]
    rows = []
    for phase, by_variant in result["windows"].items():
        for g in sorted({window, accum_steps}):
            router = zero_offload_bytes(router_n, g)
            entry: dict[str, Any] = {"r": result["neurons"], "state": phase, "G": g, "cache_mb": result["cache_mb"]}
            entry["dense_coded"] = dataclasses.asdict(zero_offload_bytes(dense_n, g))
            entry["dense_minimal"] = dataclasses.asdict(minimal_offload_bytes(dense_n, g))
            entry["router"] = dataclasses.asdict(router)
            for name, raw in by_variant.items():
                measured = Window(**raw)
                max_rows = result["neurons"] * result["layers"]
                meft = measured.plain_bytes_at(g) if name == "plain" else measured.cached_bytes_at(g, max_rows)
                entry[name] = {
                    "to_device": meft.to_device + router.to_device,
                    "to_host": meft.to_host + router.to_host,
                    "meft_to_device": meft.to_device,
                    "meft_to_host": meft.to_host,
                    "extrapolated": name != "plain" and g != len(measured.micro),
                    "rows_per_layer_micro": measured.micro_mean("rows_fetched") / result["layers"],
                    "rows_updated_per_layer": measured.step["rows_updated"] / result["layers"],
                    "micro_steps_measured": len(measured.micro),
                }
            rows.append(entry)
    return rows


def run(context: Context) -> Section:
    s = context.settings
    skipped: list[str] = []
    measured = [measure_neurons(context, neurons, skipped) for neurons in s.traffic_neurons]
    results = [result for result in measured if result is not None]
    summaries = [row for result in results for row in summarize(result, s.accum_steps, s.traffic_window)]
    window = text("a", "window_whole" if s.traffic_window >= s.accum_steps else "window_part", s=s)
    best = []  # per (r, state): the MEFT variant with the fewest bytes per optimizer step, and dense (as coded) ÷ it
    for entry in (e for e in summaries if e["G"] == s.accum_steps):
        name = min(("plain", "cache"), key=lambda n: _bytes(entry, n).total)
        best.append((entry["r"], entry["state"], name, _bytes(entry, "dense_coded").total / _bytes(entry, name).total))
    named = [f"r={r} {phase}: {fmt_ratio(ratio)} ({'no ' * (name == 'plain')}cache)" for r, phase, name, ratio in best]
    return section(
        "a",
        {"s": s, "cache_window": window, "best": "; ".join(named)},
        rows=table_rows(summaries, s.traffic_window, s.accum_steps),
        met=all(ratio >= 10 for *_, ratio in best) if best and not skipped else None,  # judged when every r ran
        notes=_notes(results, s) + skipped,
        data={"results": results, "summaries": summaries},
    )


LABELS = {  # the variants of a summary entry, as the plot names them
    "dense_coded": "dense adapter, ZeRO-Offload as coded",
    "dense_minimal": "dense adapter, minimal offload",
    "plain": "MEFT, no cache (+ routers)",
    "cache": "MEFT, device cache (+ routers; budget in the table)",
}


def _bytes(entry: dict[str, Any], name: str) -> OffloadBytes:
    """Variant ``name``'s bytes per optimizer step in a summary entry (MEFT's with the routers')."""
    return OffloadBytes(entry[name]["to_device"], entry[name]["to_host"])


def table_rows(summaries: list[dict[str, Any]], window: int, accum_steps: int) -> list[list[Any]]:
    """Per (r, state) and variant: the average bytes per micro-step and the bytes per optimizer step at G=32,
    the bytes per optimizer step at the measured window (when shorter), and the ratios of the dense baselines to it."""
    at = {(e["r"], e["state"], e["G"]): e for e in summaries}
    rows = []
    for entry in (e for e in summaries if e["G"] == accum_steps):
        plain, cache = entry["plain"], entry["cache"]
        labels = LABELS | {"cache": f"MEFT, cache {entry['cache_mb'] / 1024:.2f} GiB (+ routers)"}
        counts = {"plain": f"{plain['rows_per_layer_micro']:.0f} fetched / micro-step"}
        counts["cache"] = f"{cache['rows_updated_per_layer']:.0f} updated / step"
        coded, minimal = _bytes(entry, "dense_coded").total, _bytes(entry, "dense_minimal").total
        for name, label in labels.items():
            b, star = _bytes(entry, name), "*" if entry[name].get("extrapolated") else ""
            shorter = at[(entry["r"], entry["state"], window)]
            window_column = [fmt_bytes(_bytes(shorter, name).total)] if window != accum_steps else []
            rows.append([
                entry["r"], entry["state"], label, fmt_bytes(b.to_device / accum_steps),
                fmt_bytes(b.to_host / accum_steps), *window_column, fmt_bytes(b.total) + star,
                fmt_ratio(coded / b.total) + star, fmt_ratio(minimal / b.total) + star, counts.get(name, "all r"),
            ])  # fmt: skip
    return rows


def _notes(results: list[dict[str, Any]], s: Any) -> list[str]:
    notes = []
    for r in results:
        routers = zero_offload_bytes(r["router_params"], s.accum_steps).total
        notes.append(text("a", "note_routers", r=r, s=s, routers=routers))
        dense = minimal_offload_bytes(r["dense_params"], 1).total  # the paper's per-iteration comparison
        routers_g1 = zero_offload_bytes(r["router_params"], 1).total
        meft = {phase: Window(**v["plain"]).plain_bytes_at(1).total + routers_g1 for phase, v in r["windows"].items()}
        ratios = ", ".join(f"{phase} {fmt_ratio(dense / value)}" for phase, value in meft.items())
        notes.append(text("a", "note_paper", r=r, dense=dense, ratios=ratios))
        for name, what in (("plain", "without the cache"), ("cache", "with the cache")):
            window = Window(**r["windows"]["trained"][name])  # where its bytes went: rows vs everything else
            t = window.total()
            other_in, other_out = (t[f"bytes_to_{w}"] - t[f"row_bytes_to_{w}"] for w in ("device", "host"))
            notes.append(text("a", "note_breakdown", r=r, what=what, micro=len(window.micro), t=t, other_in=other_in,
                              other_out=other_out))  # fmt: skip
        notes.append(text("a", "note_cache", r=r))
        before, after = r["fixed_batch_loss"]
        notes.append(text("a", "note_training", r=r, steps=len(r["train_losses"]), before=before, after=after))
    if s.traffic_window < s.accum_steps:
        notes.append(text("a", "note_scaled"))
    return notes


def plot(section: Section, path: str) -> None:
    accum = max(e["G"] for e in section.data["summaries"])
    entries = [e for e in section.data["summaries"] if e["G"] == accum]
    title = "a. Host<->device bytes per optimizer step, SmolLM2-135M (30 layers), bf16 rows"
    legend = {"fontsize": 8, "ncol": 2, "loc": "upper center"}
    with plots.chart(section, path, (10, 6), title=title, ylabel=f"GB per optimizer step (G={accum})", legend=legend,
                     margins={"bottom": 0.33}) as axes:  # fmt: skip
        groups = [f"r={e['r']}\n{e['state']}" for e in entries]
        series = {label: [_bytes(e, name).total / 1e9 for e in entries] for name, label in LABELS.items()}
        for name, bars in zip(LABELS, plots.grouped_bars(axes, groups, series), strict=True):
            if name in ("plain", "cache"):
                ratios = [_bytes(e, "dense_coded").total / _bytes(e, name).total for e in entries]
                axes.bar_label(bars, [f"{r:.1f}x less" for r in ratios], fontsize=7)
        axes.set_ylim(0, axes.get_ylim()[1] * 1.3)  # room for the legend above the bars
