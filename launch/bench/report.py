"""Results on disk: ``results.json`` (every number) and ``BENCHMARKS.md`` (generated, one section per experiment)."""

from __future__ import annotations

import collections
import functools
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from bench.common import Section, paragraphs, text

FULL_COMMAND = "python launch/bench.py"
QUICK_COMMAND = "python launch/bench.py --quick"


@functools.cache
def cpu_info() -> dict[str, Any]:
    """py-cpuinfo's reading of this CPU, or nothing where it is missing (it is optional here)."""
    try:
        import cpuinfo

        return cpuinfo.get_cpu_info()
    except Exception:
        return {}


def cpu_brand() -> str:
    """The CPU's name as py-cpuinfo reads it (e.g. "AMD EPYC" or "Intel(R) Xeon(R) ..."), or "?"."""
    return cpu_info().get("brand_raw", "?")


def cpu_name(machine: dict[str, Any]) -> str:
    """A machine record's CPU with whether it has AVX-512: py-cpuinfo names two of our CPUs "AMD EPYC" alike (an
    AVX2 one and one with AVX-512), and their figures differ."""
    return machine.get("cpu", "?") + {True: " (AVX-512)", False: " (no AVX-512)"}.get(machine.get("avx512"), "")


def this_cpu() -> str:
    """:func:`cpu_name` of this machine."""
    info = cpu_info()
    return cpu_name({"cpu": cpu_brand(), "avx512": "avx512f" in info["flags"] if "flags" in info else None})


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import deepspeed
    import torch
    import transformers

    info: dict[str, Any] = {
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu": cpu_brand(),
    }
    if cpu_info():
        info["avx512"] = "avx512f" in cpu_info().get("flags", [])
    try:
        root = Path(__file__).resolve().parents[2]
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "meft_ds"], cwd=root, capture_output=True, text=True)
        info["commit"] = commit.stdout.strip() + ("+uncommitted meft_ds changes" if dirty.stdout.strip() else "")
    except OSError:
        info["commit"] = "?"
    return info


def load_results(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {"sections": {}}
    return json.loads(path.read_text())


def write_results(path: Path, sections: dict[str, Section], meta: dict[str, Any]) -> None:
    payload = {"meta": meta, "sections": {key: section.to_json() for key, section in sorted(sections.items())}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=float) + "\n")


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|")


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(map(_cell, columns)) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(map(_cell, row)) + " |" for row in rows]
    return "\n".join(lines)


STATUS = {True: "met", False: "NOT met", None: "not judged"}  # by Section.met


def machine_text(m: dict[str, Any]) -> str:
    named = collections.defaultdict(lambda: "?", m | {"cpu": cpu_name(m)})  # "?" for what was not recorded
    return text("report", "machine", m=named)


def render_section(section: Section, image: str | None, cpu: str | None = None) -> str:
    where = f", on {cpu}" if cpu else ""
    parts = [f"## {section.key}. {section.title}", *paragraphs("report", "section", s=section, where=where)]
    parts.append(markdown_table(section.columns, section.rows))
    for extra in section.data.get("extra_tables", []):  # further tables of the section, each with a title
        parts.append(f"**{extra['title']}**\n\n{markdown_table(extra['columns'], extra['rows'])}")
    if image:
        parts.append(f"![{section.title}]({image})")
    parts.append(text("report", "target", s=section, status=STATUS[section.met]))
    if section.notes:
        parts.append("\n".join(f"- {note}" for note in section.notes))
    return "\n\n".join(parts)


def render_markdown(
    sections: dict[str, Section],
    meta: dict[str, Any],
    images: dict[str, str],
    results: str = "docs/bench/results.json",
    gpu_check: str | None = None,
) -> str:
    m = meta.get("machine", {})
    machines = {key: meta.get("machines", {}).get(key, m) for key in sections}
    by_machine: dict[str, list[str]] = {}
    for key, used in machines.items():
        by_machine.setdefault(machine_text(used), []).append(key)
    if len(by_machine) > 1:  # some sections were measured by an earlier run (--only), on another machine
        machine_line = "Machines: " + "; ".join(f"{text} ({', '.join(keys)})" for text, keys in by_machine.items())
    else:
        machine_line = f"Machine: {machine_text(m)}"
    modes = sorted({s.mode for s in sections.values()})
    seconds, peak = meta.get("seconds", 0), meta.get("peak_rss_gb", 0)
    run = text("report", "run", machine=machine_line, modes=", ".join(modes), seconds=seconds, peak=peak)
    if "quick" in modes:
        run += " " + text("report", "quick")
    summary = [[f"{s.key}. {s.title}", s.target, f"**{STATUS[s.met]}**"] for s in sections.values()]
    cpus = {key: cpu_name(used) for key, used in machines.items()}  # beside every section's figures
    body = [render_section(s, images.get(s.key), cpus.get(s.key)) for s in sections.values()]
    # the GPU check's table (gpu_bench.md of launch/gpu_check.sh), or why there is none
    gpu = "## GPU check\n\n" + (gpu_check.strip() if gpu_check else text("report", "gpu_check_not_run"))
    intro = text("report", "intro", results=results, full=FULL_COMMAND, quick=QUICK_COMMAND)
    table = markdown_table(["experiment", "target", "result"], summary)
    others = "\n\n".join(paragraphs("report", "other_cpus"))  # figures of the CPUs this run did not use
    return "\n\n".join(["# Benchmarks", intro, run, table, others, *body, gpu]) + "\n"
