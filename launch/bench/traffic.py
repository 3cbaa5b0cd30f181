"""a. Host<->device bytes per optimizer step: MEFT (measured) vs a dense parallel adapter under ZeRO-Offload (analytic).

Dense side: ``bench/formulas.py`` (DeepSpeed ZeRO-2 CPU offload as coded, and the minimal offload).

MEFT side: ``meft_ds.stats(model)`` counters over real micro-steps and optimizer steps (``_how`` says which); the
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
from bench import plots
from bench.common import (
    GB,
    Context,
    Section,
    build_meft,
    fits_in_memory,
    fmt_bytes,
    fmt_ratio,
    free_memory,
    optimizer_step,
    stats_delta,
)
from bench.formulas import (
    BF16,
    FP32,
    OffloadBytes,
    dense_adapter_params,
    minimal_offload_bytes,
    zero_offload_bytes,
)


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
        micro.append(stats_delta(before, meft_ds.stats(model)))
    before = meft_ds.stats(model)
    optimizer_step(optimizers)
    return Window(micro, stats_delta(before, meft_ds.stats(model)))


def train(model: nn.Module, optimizers: list[Any], batches: list[dict[str, torch.Tensor]]) -> list[float]:
    """One optimizer step per batch; the losses."""
    losses = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        optimizer_step(optimizers)
        losses.append(loss.item())
    return losses


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
    if not fits_in_memory(4 * dense_n * FP32 + cache_mb * 2**20 + 2 * GB, f"r={neurons}", notes):
        return None
    plain = context.meft(base, {"cache_mb": 0})
    result: dict[str, Any] = {"neurons": neurons, "layers": num_layers, "dim": dim, "dense_params": dense_n}
    result |= {"config": plain.to_dict(), "cache_mb": cache_mb}
    windows: dict[str, dict[str, Window]] = {"init": {}, "trained": {}}
    plain_steps, window = s.traffic_plain_micro_steps, s.traffic_window
    with tempfile.TemporaryDirectory(prefix="meft_bench_") as trained_dir:
        print(f"  r={neurons}: MEFT without cache, {plain_steps} micro-steps at init")
        model, optimizers = build_meft(context.fresh_model(), plain, s.train_lr)
        result["router_params"] = router_params(model)
        windows["init"]["plain"] = measure_window(model, optimizers, [context.batch(i) for i in range(plain_steps)])
        print(f"  r={neurons}: training {s.train_steps} steps on facts (lr {s.train_lr})")
        result["fixed_batch_loss"] = [fixed_batch_loss(model, context.batch(0))]
        result["train_losses"] = train(model, optimizers, [context.batch(100 + i) for i in range(s.train_steps)])
        result["fixed_batch_loss"].append(fixed_batch_loss(model, context.batch(0)))
        trained_batches = [context.batch(200 + i) for i in range(plain_steps)]
        windows["trained"]["plain"] = measure_window(model, optimizers, trained_batches)
        meft_ds.save_adapter(model, trained_dir)
        del model, optimizers  # the optimizers hold the adapters, hence the row store
        free_memory()
        print(f"  r={neurons}: MEFT with a {cache_mb:.0f} MiB cache, one step of {window} micro-steps x2")
        cached = context.meft(base, {"cache_mb": cache_mb})
        model, optimizers = build_meft(context.fresh_model(), cached, s.train_lr)
        windows["init"]["cache"] = measure_window(model, optimizers, [context.batch(i) for i in range(window)])
        result["cache_device_bytes"] = device_cache_bytes(model)
        meft_ds.load_adapter(model, trained_dir)
        trained_batches = [context.batch(200 + i) for i in range(window)]
        windows["trained"]["cache"] = measure_window(model, optimizers, trained_batches)
        del model, optimizers
        free_memory()
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
            coded = zero_offload_bytes(dense_n, g)
            minimal = minimal_offload_bytes(dense_n, g)
            router = zero_offload_bytes(router_n, g)
            entry: dict[str, Any] = {"r": result["neurons"], "state": phase, "G": g, "cache_mb": result["cache_mb"]}
            entry["dense_coded"], entry["dense_minimal"] = dataclasses.asdict(coded), dataclasses.asdict(minimal)
            entry["router"] = dataclasses.asdict(router)
            for name, raw in by_variant.items():
                measured = Window(**raw)
                if name == "plain":
                    meft = measured.plain_bytes_at(g)
                else:
                    meft = measured.cached_bytes_at(g, max_rows=result["neurons"] * result["layers"])
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
    g = f"G={s.accum_steps}"
    columns = [
        "r", "state", "variant", f"to device / micro-step (avg, {g})", f"to host / micro-step (avg, {g})",
        *([f"per opt. step, G={s.traffic_window}"] if s.traffic_window != s.accum_steps else []),
        f"per opt. step, {g}", f"dense (as coded) ÷ this, {g}", f"dense (minimal) ÷ this, {g}", "rows / layer",
    ]  # fmt: skip
    return Section(
        key="a",
        title="Host<->device bytes per optimizer step: MEFT vs a dense parallel adapter under ZeRO-Offload",
        what=(
            f"Bytes that cross between host and device for one optimizer step of {s.accum_steps} micro-steps of "
            f"{s.micro_batch} x {s.seq_len} tokens (the paper's effective batch 64) on SmolLM2-135M-Instruct "
            f"(30 layers, d=576) with adapters of r rows per layer on every layer, top-K = {s.top_k}: MEFT without "
            "and with the device row cache, against a dense parallel adapter of the same r trained with DeepSpeed "
            "ZeRO-2 CPU offload, at initialisation and after brief training on facts."
        ),
        how=_how(s),
        columns=columns,
        rows=table_rows(summaries, s.traffic_window, s.accum_steps),
        target=">= 10x fewer bytes per optimizer step than the dense adapter under ZeRO-Offload (paper: 3.57x)",
        met=_met(summaries, s.accum_steps, complete=not skipped),
        verdict=verdict(summaries, s.accum_steps),
        notes=_notes(results, s) + skipped,
        data={"results": results, "summaries": summaries},
    )


def _cache_window(s: Any) -> str:
    if s.traffic_window >= s.accum_steps:
        return f"one whole real optimizer step of {s.accum_steps} micro-steps, every byte measured"
    return (
        f"one real optimizer step of {s.traffic_window} micro-steps; for G={s.accum_steps} (*) each extra micro-step "
        "is charged the bytes of the last measured one, plus the flushed gradients of the rows it fetched (an "
        "over-estimate: a row travels at most once per optimizer step, so misses only fall)"
    )


def _how(s: Any) -> str:
    return (
        "Dense: analytic, from DeepSpeed 0.19.8 stage_1_and_2.py as coded (bf16 gradients round-trip through the CPU "
        "accumulation buffer at every micro-step after the first, an fp32 copy at the boundary, bf16 parameters back "
        "once per step; see launch/bench/formulas.py), and the minimal offload (one bf16 gradient copy per micro-step, "
        "one bf16 parameter copy per step). MEFT: meft_ds.stats(model) counters (bytes_to_device, bytes_to_host, "
        "which include row_bytes_*, indices and hidden states) over real forward+backward micro-steps and optimizer "
        "steps (SparseRowAdam + AdamW on the routers) in a plain PyTorch loop, rows, hidden states and router logits "
        "in bf16, indices in int16 where they fit, plus the routers' own ZeRO-Offload bytes "
        f"(analytic, N = L*E*d). Without the cache: mean of {s.traffic_plain_micro_steps} micro-steps times G (a "
        f"micro-step's bytes do not depend on the others). With the cache: {_cache_window(s)}. Per micro-step = per "
        "optimizer step / G. 'trained': after "
        f"{s.train_steps} optimizer steps (lr {s.train_lr}) "
        "on facts."
    )


def _variants(entry: dict[str, Any]) -> list[tuple[str, str, OffloadBytes, bool, str]]:
    """(key, label, bytes per optimizer step, extrapolated?, rows note) of every variant of one summary entry."""
    out = [
        ("dense_coded", "dense adapter, ZeRO-Offload as coded", OffloadBytes(**entry["dense_coded"]), False, "all r"),
        ("dense_minimal", "dense adapter, minimal offload", OffloadBytes(**entry["dense_minimal"]), False, "all r"),
    ]
    plain, cache = entry["plain"], entry["cache"]
    out.append(("plain", "MEFT, no cache (+ routers)", OffloadBytes(plain["to_device"], plain["to_host"]),
                plain["extrapolated"], f"{plain['rows_per_layer_micro']:.0f} fetched / micro-step"))  # fmt: skip
    out.append((
        "cache", f"MEFT, cache {entry['cache_mb'] / 1024:.2f} GiB (+ routers)",
        OffloadBytes(cache["to_device"], cache["to_host"]), cache["extrapolated"],
        f"{cache['rows_updated_per_layer']:.0f} updated / step",
    ))  # fmt: skip
    return out


def table_rows(summaries: list[dict[str, Any]], window: int, accum_steps: int) -> list[list[Any]]:
    """Per (r, state) and variant: the average bytes per micro-step and the bytes per optimizer step at G=32,
    the bytes per optimizer step at the measured window (when shorter), and the ratios of the dense baselines to it."""
    by_key: dict[tuple[int, str], dict[int, dict[str, Any]]] = {}
    for entry in summaries:
        by_key.setdefault((entry["r"], entry["state"]), {})[entry["G"]] = entry
    rows = []
    for (neurons, phase), by_g in by_key.items():
        at_window = {key: b for key, _, b, _, _ in _variants(by_g[window])}
        paper = _variants(by_g[accum_steps])
        coded, minimal = paper[0][2].total, paper[1][2].total
        for key, label, b, extrapolated, rows_note in paper:
            star = "*" if extrapolated else ""
            window_column = [fmt_bytes(at_window[key].total)] if window != accum_steps else []
            rows.append([
                neurons, phase, label, fmt_bytes(b.to_device / accum_steps), fmt_bytes(b.to_host / accum_steps),
                *window_column, fmt_bytes(b.total) + star, fmt_ratio(coded / b.total) + star,
                fmt_ratio(minimal / b.total) + star, rows_note,
            ])  # fmt: skip
    return rows


def _best_ratios(summaries: list[dict[str, Any]], accum_steps: int) -> list[tuple[int, str, str, float]]:
    """Per (r, state): the MEFT variant with the fewest bytes at ``accum_steps`` and dense (as coded) ÷ it."""
    best = []
    for entry in summaries:
        if entry["G"] != accum_steps:
            continue
        variants = [(name, entry[name]["to_device"] + entry[name]["to_host"]) for name in ("plain", "cache")]
        name, total = min(variants, key=lambda item: item[1])
        best.append((entry["r"], entry["state"], name, OffloadBytes(**entry["dense_coded"]).total / total))
    return best


def _met(summaries: list[dict[str, Any]], accum_steps: int, complete: bool) -> bool | None:
    """Judged only when every r was measured."""
    best = _best_ratios(summaries, accum_steps)
    if not complete or not best:
        return None
    return all(ratio >= 10 for *_, ratio in best)


def verdict(summaries: list[dict[str, Any]], accum_steps: int) -> str:
    best = _best_ratios(summaries, accum_steps)
    parts = [
        f"r={r} {phase}: {fmt_ratio(ratio)} ({'cache' if name == 'cache' else 'no cache'})"
        for r, phase, name, ratio in best
    ]
    return f"Dense (as coded) ÷ best MEFT variant per optimizer step at G={accum_steps}: " + "; ".join(parts) + "."


def breakdown(result: dict[str, Any], name: str) -> str:
    """Where one measured MEFT window's bytes went: rows vs everything else (hidden states, indices), each way."""
    window = Window(**result["windows"]["trained"][name])
    total = window.total()
    rows_in, rows_out = total["row_bytes_to_device"], total["row_bytes_to_host"]
    other_in, other_out = total["bytes_to_device"] - rows_in, total["bytes_to_host"] - rows_out
    what = "without the cache" if name == "plain" else "with the cache"
    return (
        f"r={result['neurons']}, trained, {what}, measured over {len(window.micro)} micro-steps + the step: rows "
        f"{fmt_bytes(rows_in)} to the device and row gradients {fmt_bytes(rows_out)} back; hidden states, router "
        f"choices and indices {fmt_bytes(other_in)} to the device and {fmt_bytes(other_out)} back."
    )


def paper_comparison(result: dict[str, Any]) -> str:
    """The paper's own comparison: one iteration without accumulation, where the offloaded dense adapter moves
    2|theta| (bf16 gradients out, bf16 parameters in), against one MEFT micro-step without the cache."""
    dense = minimal_offload_bytes(result["dense_params"], 1).total
    parts = []
    for phase, by_variant in result["windows"].items():
        meft = Window(**by_variant["plain"]).plain_bytes_at(1).total
        parts.append(f"{phase} {fmt_ratio(dense / (meft + zero_offload_bytes(result['router_params'], 1).total))}")
    return (
        f"r={result['neurons']}, the paper's per-iteration comparison (no accumulation; the dense adapter moves "
        f"2|theta| = {fmt_bytes(dense)}, MEFT one micro-step without the cache, routers included): "
        + ", ".join(parts)
        + " less (paper: 3.57x at r=6144 on LLaMA-7B)."
    )


def _notes(results: list[dict[str, Any]], s: Any) -> list[str]:
    notes = []
    for result in results:
        r = result["neurons"]
        router = zero_offload_bytes(result["router_params"], s.accum_steps).total
        notes.append(
            f"r={r}: the routers ({result.get('router_params', 0):,} parameters) add {fmt_bytes(router)} per optimizer "
            f"step at G={s.accum_steps} under ZeRO-Offload (included above); kept on the device with a device "
            "optimizer they would add nothing."
        )
        notes.append(paper_comparison(result))
        notes.extend(breakdown(result, name) for name in ("plain", "cache"))
        before, after = result["fixed_batch_loss"]
        notes.append(
            f"r={r}: cache budget {result['cache_mb']:.0f} MiB for the model (cache_mb; default: the dense "
            f"adapter's device bytes under ZeRO-Offload, bf16 weights + bf16 gradients = 4 bytes x "
            f"{result['dense_params']:,}); {fmt_bytes(result['cache_device_bytes'])} allocated."
        )
        notes.append(
            f"r={r}: the brief training ({len(result['train_losses'])} steps) took the loss on a fixed batch from "
            f"{before:.3f} to {after:.3f}."
        )
    if s.traffic_window < s.accum_steps:
        notes.append("* scaled from the measured window (see how it was measured).")
    return notes


def plot(section: Section, path: str) -> None:
    accum = max(e["G"] for e in section.data["summaries"])
    entries = [e for e in section.data["summaries"] if e["G"] == accum]
    variants = [{key: b for key, _, b, _, _ in _variants(entry)} for entry in entries]
    names = {
        "dense_coded": "dense adapter, ZeRO-Offload as coded",
        "dense_minimal": "dense adapter, minimal offload",
        "plain": "MEFT, no cache (+ routers)",
        "cache": "MEFT, device cache (+ routers; budget in the table)",
    }
    fig, axes = plots.figure(10, 6)
    groups = [f"r={e['r']}\n{e['state']}" for e in entries]
    series = {label: [v[name].total / 1e9 for v in variants] for name, label in names.items()}
    bars = plots.grouped_bars(axes, groups, series)
    for name, container in zip(names, bars, strict=True):
        if name in ("plain", "cache"):
            ratios = [v["dense_coded"].total / v[name].total for v in variants]
            axes.bar_label(container, [f"{r:.1f}x less" for r in ratios], fontsize=7)
    axes.set_ylabel(f"GB per optimizer step (G={accum})")
    axes.set_ylim(0, axes.get_ylim()[1] * 1.3)  # room for the legend above the bars
    axes.set_title("a. Host<->device bytes per optimizer step, SmolLM2-135M (30 layers), bf16 rows")
    axes.legend(fontsize=8, ncol=2, loc="upper center")
    plots.save(fig, section, path, bottom=0.33)
