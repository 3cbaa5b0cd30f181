"""a. Host<->device bytes per optimizer step: MEFT (measured) vs a dense parallel adapter under ZeRO-Offload (analytic).

Dense side: ``bench/formulas.py`` (DeepSpeed ZeRO-2 CPU offload as coded, and the minimal offload).

MEFT side: ``meft_ds.stats(model)`` counters over real micro-steps and optimizer steps (sections.md says which); the
routers are engine parameters that move like the dense adapter under ZeRO-Offload, so their bytes are added.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import meft_ds
from bench import common, plots
from bench.common import GB, Context, Section, fmt_bytes, fmt_ratio, paragraphs, section, text
from bench.formulas import BF16, OffloadBytes, dense_adapter_params, minimal_offload_bytes, zero_offload_bytes
from meft_ds.memory import store_bytes

# ----------------------------------------------------------------------------------------------------------------
# measuring MEFT


@dataclass
class Window:
    """The counters of one optimizer step: one delta per micro-step (forward+backward) and one for the step itself
    (where the device cache flushes its gradients)."""

    micro: list[dict[str, int]]
    step: dict[str, int]

    def total(self) -> dict[str, int]:
        total = Counter(self.step)
        for delta in self.micro:
            total.update(delta)  # unlike Counter's +, keeps the counters that stayed at zero
        return dict(total)

    def micro_mean(self, key: str) -> float:
        return sum(delta[key] for delta in self.micro) / len(self.micro)

    def cache_bytes(self, accum_steps: int) -> OffloadBytes:
        """With the cache, the bytes of the measured optimizer step, which must be of ``accum_steps`` micro-steps (a
        row travels once per optimizer step, so a shorter step's bytes do not scale)."""
        if len(self.micro) != accum_steps:
            raise ValueError(f"measured {len(self.micro)} micro-steps with the cache, not {accum_steps}")
        total = self.total()
        return OffloadBytes(total["bytes_to_device"], total["bytes_to_host"])

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
    dense_n = dense_adapter_params(config.num_hidden_layers, neurons, config.hidden_size)
    cache_mb = context.cache_mb if context.cache_mb is not None else 2 * BF16 * dense_n / 2**20
    # one store (rows, two moments, at worst a full gradient accumulator) + the cache + a model copy and activations
    needed = store_bytes(config.num_hidden_layers, neurons, config.hidden_size) + cache_mb * 2**20 + 2 * GB
    if not common.fits_in_memory(needed, f"r={neurons}", notes):
        return None
    result: dict[str, Any] = {"neurons": neurons, "layers": config.num_hidden_layers, "dense_params": dense_n}
    result["cache_mb"] = cache_mb
    windows: dict[str, dict[str, Window]] = {"init": {}, "trained": {}}
    plain_steps, window = s.traffic_plain_micro_steps, s.accum_steps
    with tempfile.TemporaryDirectory(prefix="meft_bench_") as trained_dir:
        print(f"  r={neurons}: MEFT without cache, {plain_steps} micro-steps at init")
        model, optimizers = common.build_meft(context.fresh_model(), context.meft(base, {"cache_mb": 0}), s.train_lr)
        result["router_params"] = sum(a.router.weight.numel() for a in meft_ds.adapters(model))
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


Bytes = dict[str, OffloadBytes]  # per variant (LABELS)

LABELS = {  # the variants, as the table (the cache's with its budget) and the plot name them
    "dense_coded": "dense adapter, ZeRO-Offload as coded",
    "dense_minimal": "dense adapter, minimal offload",
    "plain": "MEFT, no cache (+ routers)",
    "cache": "MEFT, device cache (+ routers; budget in the table)",
}


def variant_bytes(result: dict[str, Any], phase: str, name: str, accum_steps: int) -> OffloadBytes:
    """Variant ``name``'s bytes per optimizer step of ``accum_steps`` micro-steps, for one ``r`` in ``phase``: the
    dense baselines' analytic, MEFT's measured (without the cache: scaled from its micro-steps) plus the routers' under
    ZeRO-Offload."""
    if name == "dense_coded":
        return zero_offload_bytes(result["dense_params"], accum_steps)
    if name == "dense_minimal":
        return minimal_offload_bytes(result["dense_params"], accum_steps)
    window = Window(**result["windows"][phase][name])
    meft = window.plain_bytes_at(accum_steps) if name == "plain" else window.cache_bytes(accum_steps)
    router = zero_offload_bytes(result["router_params"], accum_steps)
    return OffloadBytes(meft.to_device + router.to_device, meft.to_host + router.to_host)


def per_step(results: list[dict[str, Any]], accum_steps: int) -> list[tuple[dict[str, Any], str, Bytes]]:
    """Per (r, state): each variant's bytes per optimizer step of ``accum_steps`` micro-steps."""
    return [
        (result, phase, {name: variant_bytes(result, phase, name, accum_steps) for name in LABELS})
        for result in results
        for phase in result["windows"]
    ]


def run(context: Context) -> Section:
    s = context.settings
    skipped: list[str] = []
    measured = [measure_neurons(context, neurons, skipped) for neurons in s.traffic_neurons]
    results = [result for result in measured if result is not None]
    best = []  # per (r, state): the MEFT variant with the fewest bytes per optimizer step, and dense (as coded) ÷ it
    for result, phase, b in per_step(results, s.accum_steps):
        name = min(("plain", "cache"), key=lambda n: b[n].total)
        best.append((result["neurons"], phase, name, b["dense_coded"].total / b[name].total))
    named = [f"r={r} {phase}: {fmt_ratio(ratio)} ({'no ' * (name == 'plain')}cache)" for r, phase, name, ratio in best]
    return section(
        "a",
        {"s": s, "best": "; ".join(named)},
        rows=table_rows(results, s.accum_steps),
        met=all(ratio >= 10 for *_, ratio in best) if best and not skipped else None,  # judged when every r ran
        notes=_notes(results, s) + skipped,
        data={"results": results, "accum_steps": s.accum_steps},
    )


def table_rows(results: list[dict[str, Any]], accum_steps: int) -> list[list[Any]]:
    """Per (r, state) and variant: the average bytes per micro-step and per optimizer step, and the ratios of the
    dense baselines to it."""
    rows = []
    for result, phase, b in per_step(results, accum_steps):
        plain, cache = (Window(**result["windows"][phase][name]) for name in ("plain", "cache"))
        labels = LABELS | {"cache": f"MEFT, cache {result['cache_mb'] / 1024:.2f} GiB (+ routers)"}
        counts = {
            "plain": f"{plain.micro_mean('rows_fetched') / result['layers']:.0f} fetched / micro-step",
            "cache": f"{cache.step['rows_updated'] / result['layers']:.0f} updated / step",
        }
        coded, minimal = b["dense_coded"].total, b["dense_minimal"].total
        for name, label in labels.items():
            rows.append([
                result["neurons"], phase, label, fmt_bytes(b[name].to_device / accum_steps),
                fmt_bytes(b[name].to_host / accum_steps), fmt_bytes(b[name].total), fmt_ratio(coded / b[name].total),
                fmt_ratio(minimal / b[name].total), counts.get(name, "all r"),
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
            other = {way: t[f"bytes_to_{way}"] - t[f"row_bytes_to_{way}"] for way in ("device", "host")}
            notes.append(text("a", "note_breakdown", r=r, what=what, micro=len(window.micro), t=t, other=other))
        before, after = r["fixed_batch_loss"]
        steps = len(r["train_losses"])
        notes += paragraphs("a", "notes_cache_training", r=r, steps=steps, before=before, after=after)
    return notes


def plot(section: Section, path: str) -> None:
    accum = section.data["accum_steps"]
    cells = per_step(section.data["results"], accum)
    title = "a. Host<->device bytes per optimizer step, SmolLM2-135M (30 layers), bf16 rows"
    legend = {"fontsize": 8, "ncol": 2, "loc": "upper center"}
    with plots.chart(section, path, (10, 6), title=title, ylabel=f"GB per optimizer step (G={accum})", legend=legend,
                     margins={"bottom": 0.33}) as axes:  # fmt: skip
        groups = [f"r={result['neurons']}\n{phase}" for result, phase, _ in cells]
        series = {label: [b[name].total / 1e9 for *_, b in cells] for name, label in LABELS.items()}
        for name, bars in zip(LABELS, plots.grouped_bars(axes, groups, series), strict=True):
            if name in ("plain", "cache"):
                ratios = [b["dense_coded"].total / b[name].total for *_, b in cells]
                axes.bar_label(bars, [f"{r:.1f}x less" for r in ratios], fontsize=7)
        axes.set_ylim(0, axes.get_ylim()[1] * 1.3)  # room for the legend above the bars
