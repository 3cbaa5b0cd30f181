"""e. CPU routing cost vs the number of key-experts E at fixed r: measured, and the analytic T (E + n_probe r/E) d,
smallest at ``E = sqrt(n_probe r)`` (SPEC.md: "minimal near E = sqrt(r)", up to the factor n_probe)."""

from __future__ import annotations

import math
import statistics
from typing import Any

import torch

from bench import plots
from bench.common import Context, Section, Settings, fmt_ratio, median_seconds, section
from meft_ds.routing import select_rows

ROUTER_INIT_SCALE = 50.0  # the library's default: router row e = 50 x the mean of expert e's keys


def analytic_macs(tokens: int, experts: int, n_probe: int, neurons: int, dim: int) -> int:
    """Multiply-adds of routing one micro-batch: router scores plus the probed experts' key scores."""
    return tokens * (experts + n_probe * neurons // experts) * dim


def expert_grid(neurons: int, top_k: int, n_probe: int, candidates: tuple[int, ...]) -> list[int]:
    """The candidates that are valid expert counts: divide r, and the probed pool holds at least K neurons."""
    return [e for e in candidates if neurons % e == 0 and n_probe <= e and n_probe * (neurons // e) >= top_k]


def time_routing(
    hidden: torch.Tensor, keys: torch.Tensor, experts: int, n_probe: int, top_k: int, repeats: int
) -> tuple[float, float]:
    """Median seconds of the router (scores + top n_probe) and of ``meft_ds.routing.select_rows``."""
    neurons, dim = keys.shape
    router = ROUTER_INIT_SCALE * keys.reshape(experts, neurons // experts, dim).mean(dim=1)

    def route() -> tuple[torch.Tensor, torch.Tensor]:
        return (hidden @ router.T).topk(n_probe, dim=1)

    gates, probe_ids = route()
    router_seconds, _ = median_seconds(route, repeats=repeats)
    select_seconds, _ = median_seconds(
        lambda: select_rows(hidden, probe_ids, gates, keys, expert_size=neurons // experts, top_k=top_k),
        repeats=repeats,
    )
    return router_seconds, select_seconds


def run(context: Context) -> Section:
    s = context.settings
    r, tokens, dim, n_probe, k = s.routing_neurons, s.routing_tokens, s.routing_dim, s.routing_probe, s.top_k
    generator = torch.Generator().manual_seed(0)
    rows = torch.zeros(r, 2, dim)  # the store's layout: keys are a strided view
    rows[:, 0] = torch.randn(r, dim, generator=generator) * 0.02
    keys = rows[:, 0]
    hidden = torch.randn(tokens, dim, generator=generator)
    measured = []
    for experts in expert_grid(r, k, n_probe, s.routing_experts):
        router_s, select_s = time_routing(hidden, keys, experts, n_probe, k, s.routing_repeats)
        macs = analytic_macs(tokens, experts, n_probe, r, dim)
        measured.append({"experts": experts, "router": router_s, "select": select_s, "macs": macs})
        print(f"  E={experts:5d}: router {router_s * 1e3:6.2f} ms, select_rows {select_s * 1e3:6.2f} ms")
    return report(s, {"measured": measured, "neurons": r, "tokens": tokens, "dim": dim})


def report(s: Settings, data: dict[str, Any]) -> Section:
    """The section of what :func:`run` measured (``data``: ``measured``, ``neurons``, ``tokens``, ``dim``): the
    optimum, the fastest E, the median GMAC/s of the router (``T E d``) and of the probed-key scoring
    (``T n_probe r/E d``) over the grid."""
    measured, r, tokens, dim = (data[key] for key in ("measured", "neurons", "tokens", "dim"))
    n_probe = s.routing_probe
    optimum = math.sqrt(n_probe * r)
    router_rate = statistics.median(tokens * m["experts"] * dim / m["router"] / 1e9 for m in measured)
    select_rate = statistics.median(tokens * n_probe * (r // m["experts"]) * dim / m["select"] / 1e9 for m in measured)
    best = min(measured, key=lambda m: m["router"] + m["select"])
    fastest = best["router"] + best["select"]
    table = [
        [m["experts"], r // m["experts"], f"{m['router'] * 1e3:.2f}", f"{m['select'] * 1e3:.2f}",
         f"{(m['router'] + m['select']) * 1e3:.2f}", f"{m['macs'] / 1e9:.3f}",
         fmt_ratio((m["router"] + m["select"]) / fastest)]
        for m in measured
    ]  # fmt: skip
    rate = router_rate / select_rate
    data = {"measured": measured, "optimum": optimum, "weighted_optimum": optimum * math.sqrt(rate)}
    data |= {"router_gmacs": router_rate, "select_gmacs": select_rate, "neurons": r, "tokens": tokens, "dim": dim}
    values = data | {"s": s, "k": s.top_k, "r": r, "n_probe": n_probe, "first": measured[0], "last": measured[-1]}
    values |= {"threads": torch.get_num_threads(), "sqrt_r": math.sqrt(r), "rate": rate, "best": best}
    values["analytic"] = min(measured, key=lambda m: m["macs"])
    return section("e", values, rows=table, met=optimum / 2 <= best["experts"] <= optimum * 2, data=data)


def plot(section: Section, path: str) -> None:
    data: dict[str, Any] = section.data
    measured, optimum, weighted = data["measured"], data["optimum"], data["weighted_optimum"]
    experts = [m["experts"] for m in measured]
    title = f"e. Routing cost vs E, r={data['neurons']}, T={data['tokens']}, d={data['dim']}"
    with plots.chart(section, path, title=title, xlabel="E (key-experts)", ylabel="ms per micro-batch") as axes:
        plots.lines(axes, experts, [
            ([m["router"] * 1e3 for m in measured], "s--", "router (T E d)"),
            ([m["select"] * 1e3 for m in measured], "^--", "select_rows (T n_probe r/E d)"),
            ([(m["router"] + m["select"]) * 1e3 for m in measured], "o-", "total (measured)"),
        ])  # fmt: skip
        axes.axvline(optimum, color="gray", linestyle=":", label=f"sqrt(n_probe r) = {optimum:.0f}")
        axes.axvline(weighted, color="tab:green", linestyle=":", label=f"optimum at measured GMAC/s = {weighted:.0f}")
        twin = axes.twinx()
        twin.plot(experts, [m["macs"] / 1e9 for m in measured], color="black", alpha=0.4, label="analytic (right axis)")
        twin.set_ylabel("analytic GMAC: T (E + n_probe r/E) d")
        (lines, labels), (twin_lines, twin_labels) = axes.get_legend_handles_labels(), twin.get_legend_handles_labels()
        axes.legend(lines + twin_lines, labels + twin_labels, fontsize=8)
