"""f. Scale out: bytes exchanged between data-parallel ranks per optimizer step, and the NVMe tier's read/write GB/s.

Bytes between ranks. Two ranks on CPU (``torch.distributed.run --nproc_per_node 2``, gloo, one torch thread each) run
``launch/bench/scaleout_driver.py``: ``meft_ds.initialize`` (ZeRO stage 0, fp32) on the same frozen model, adapters on
its last ``ADAPTER_LAYERS`` layers with ``r = Settings.step_neurons`` and ``K = Settings.top_k``, ``MICRO_STEPS``
micro-batches of ``micro_batch x seq_len`` tokens per rank per optimizer step, once with replicated stores and once
with sharded ones (``"store": {"shard": true}``). The bytes are the library's counter ``bytes_between_ranks`` of
``meft_ds.stats`` (what this rank put into the collectives: row ids and gradients at the optimizer step; with sharded
stores also the routing all-gathers and the row fetches from their owners during the forward), per rank per optimizer
step, plus the routers' gradients that the DeepSpeed engine all-reduces (analytic: their fp32 bytes). A dense
adapter of the same r all-reduces its whole gradient every optimizer step: ``2 r d`` fp32 values per layer (bf16
would halve it). For an all-reduce "put in" is the tensor each rank contributes (a ring all-reduce over 2 ranks sends
exactly that much per rank), the same definition for both sides.

The model: the real SmolLM2-135M-Instruct in the full run (every rank loads it), a random model of SmolLM2's shape
with 4 layers and random tokens in the quick run, the context's own model in tests.

NVMe tier. In this process: a model with ``NvmeRowStore`` adapters (``E = r / EXPERT_ROWS`` experts, the unit of
I/O) whose RAM budget holds only the expert blocks one micro-batch of ``NVME_TOKENS`` tokens can probe, smaller than
the store, trains ``NVME_STEPS`` optimizer steps; each store's ``_io`` (submit) and ``_wait`` calls are timed, and
read and write GB/s = the store's counters ``nvme_bytes_read`` / ``nvme_bytes_written`` over the time spent in them.
In the same folder and run: one file of the store's size (16 to 256 MiB) written and read whole through the same
DeepSpeed async I/O handle (O_DIRECT, like the store), and with plain buffered writes + fsync and a cold read (the
file's pages dropped with posix_fadvise). The folder is a temporary one, or ``$MEFT_BENCH_NVME`` when set.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import meft_ds
from bench.common import GB, MB, Context, Section, Settings, figure_footer, fits_in_memory, fmt_bytes, fmt_ratio
from bench.traffic import build_meft, optimizer_step, stats_delta

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("scaleout_driver.py")
RANKS = 2
ADAPTER_LAYERS = 4  # the last layers of the model
MICRO_STEPS = 2  # micro-batches per optimizer step (per rank)
MAX_STEPS = 2  # optimizer steps per variant (fewer if Settings.train_steps is smaller)
ID_BYTES = 8  # row ids travel as int64
GRAD_BYTES = 4  # row gradients travel in fp32
EXPERT_ROWS = 16  # NVMe part: rows per key-expert block
NVME_TOKENS = 16  # NVMe part: tokens per micro-batch (their probed experts bound the RAM budget)
NVME_STEPS = 3
RAW_MIN, RAW_MAX = 16 * 2**20, 256 * 2**20
IO_REPEATS = 3
# SmolLM2-135M's shape with 4 layers: the quick run's random model
RANDOM_LLAMA = {
    "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 4, "num_attention_heads": 9,
    "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 2048, "tie_word_embeddings": True,
}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# byte formulas


def dense_allreduce_bytes(neurons: int, dim: int, layers: int, element_bytes: int = GRAD_BYTES) -> int:
    """What a dense adapter of ``neurons`` rows (keys and values, ``2 r d`` values per layer) puts into the gradient
    all-reduce of one optimizer step, per rank."""
    return layers * 2 * neurons * dim * element_bytes


def replicated_exchange_bytes(touched: int, union: int, dim: int, layers: int) -> int:
    """``bytes_between_ranks`` of one replicated-store exchange: this rank's touched row ids (all-gather) and the
    gradients laid out over the ranks' union (all-reduce), spread evenly over the layers' counters."""
    return layers * ((touched * ID_BYTES + union * 2 * dim * GRAD_BYTES) // layers)


def sharded_exchange_bytes(touched: int, dim: int, layers: int) -> int:
    """``bytes_between_ranks`` of one sharded-store exchange: every touched row's id and gradient sent to its owner
    (all-to-all; the part a rank owns itself goes through the collective too)."""
    return layers * ((touched * (ID_BYTES + 2 * dim * GRAD_BYTES)) // layers)


# ----------------------------------------------------------------------------------------------------------------
# the model both parts use


def _is_builtin(model: torch.nn.Module) -> bool:
    from meft_ds.models import ModelLoadError, resolve_model

    try:
        return getattr(model.config, "_name_or_path", None) == resolve_model(None)[0]
    except ModelLoadError:
        return False


def model_plan(context: Context) -> dict[str, Any]:
    """Which model and text: the context's own model (tests, or any model a caller put there), the real SmolLM2 in
    the full run, a random model of SmolLM2's shape with random tokens in the quick run."""
    s = context.settings
    if context.model is not None and not _is_builtin(context.model):
        return {"source": "context", "label": f"the context's model ({type(context.model).__name__})"}
    if s.step_neurons >= Settings.full().step_neurons:
        return {"source": "builtin", "label": "SmolLM2-135M-Instruct (real weights, real text)"}
    return {
        "source": {"random": RANDOM_LLAMA},
        "label": "a random LLaMA of SmolLM2-135M's shape, 4 layers, random tokens",
    }


def plan_model(context: Context, plan: dict[str, Any]) -> torch.nn.Module:
    if isinstance(plan["source"], dict):
        from transformers import AutoModelForCausalLM, LlamaConfig

        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(LlamaConfig(**RANDOM_LLAMA)).eval().requires_grad_(False)
    return context.fresh_model()


def plan_batches(context: Context, plan: dict[str, Any], count: int) -> list[dict[str, torch.Tensor]]:
    s = context.settings
    if isinstance(plan["source"], dict):
        generator = torch.Generator().manual_seed(0)
        batches = []
        for _ in range(count):
            ids = torch.randint(0, RANDOM_LLAMA["vocab_size"], (s.micro_batch, s.seq_len), generator=generator)
            batches.append({"input_ids": ids, "labels": ids.clone()})
        return batches
    return context.batches()


def num_layers(context: Context, plan: dict[str, Any]) -> int:
    if isinstance(plan["source"], dict):
        return RANDOM_LLAMA["num_hidden_layers"]
    return context.base().config.num_hidden_layers


def plan_dim(context: Context, plan: dict[str, Any]) -> int:
    if isinstance(plan["source"], dict):
        return RANDOM_LLAMA["hidden_size"]
    return context.base().config.hidden_size


def adapter_layers(total: int) -> list[int]:
    return list(range(max(0, total - ADAPTER_LAYERS), total))


# ----------------------------------------------------------------------------------------------------------------
# part 1: bytes between ranks


def launch_env() -> dict[str, str]:
    """This environment without a distributed rank of its own (tests set one), the package importable."""
    dropped = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR", "GROUP_RANK")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    paths = [str(ROOT), str(ROOT / "launch"), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def run_ranks(spec: dict[str, Any], workdir: Path, timeout: float = 1200) -> list[dict[str, Any]]:
    """Run the driver on ``RANKS`` processes; every rank's JSON, in rank order."""
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(RANKS), "--master_port", str(port),
        str(DRIVER), str(spec_path),
    ]  # fmt: skip
    print(f"  {shlex.join(command)}", flush=True)
    result = subprocess.run(command, cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"the {RANKS} ranks failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return [json.loads((Path(spec["out"]) / f"rank_{rank}.json").read_text()) for rank in range(RANKS)]


def summarize_variant(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-rank, per-optimizer-step means (over ranks and steps) of one variant's counters."""
    first = per_rank[0]
    layers, dim, neurons = len(first["layers"]), first["dim"], first["num_neurons"]
    steps = [step for rank in per_rank for step in rank["steps"]]
    routers = first["router_params"] * GRAD_BYTES  # the engine all-reduces the routers' fp32 gradients

    def mean(values: list[float]) -> float:
        return statistics.fmean(values)

    summary = {
        "variant": first["variant"],
        "layers": layers,
        "dim": dim,
        "neurons": neurons,
        "experts": first["num_experts"],
        "rows_held": statistics.fmean(r["rows_held"] for r in per_rank),
        "touched": mean([s["touched"] for s in steps]),
        "foreign": mean([s["foreign"] for s in steps]),
        "updated": mean([s["step"]["rows_updated"] for s in steps]),
        "exchange": mean([s["step"]["bytes_between_ranks"] for s in steps]),
        "forward": mean([s["micro"]["bytes_between_ranks"] for s in steps]),
        "routers": routers,
        "seconds": mean([s["seconds"] for s in steps]),
        "dense": dense_allreduce_bytes(neurons, dim, layers),
        "per_rank_counted": [
            sum(s["micro"]["bytes_between_ranks"] + s["step"]["bytes_between_ranks"] for s in r["steps"])
            for r in per_rank
        ],
        "per_rank_final": [r["final"]["bytes_between_ranks"] for r in per_rank],
    }
    summary["total"] = summary["exchange"] + summary["forward"] + summary["routers"]
    return summary


def measure_between_ranks(context: Context, plan: dict[str, Any], notes: list[str]) -> dict[str, Any] | None:
    s = context.settings
    steps = max(1, min(MAX_STEPS, s.train_steps))
    total_layers = num_layers(context, plan)
    layers = adapter_layers(total_layers)
    base = {"num_neurons": s.step_neurons, "top_k": s.top_k, "layers": layers}
    config = meft_ds.MeftConfig.from_dict({**base, **context.overrides})
    meft = config.to_dict()
    dim = plan_dim(context, plan)
    replicated = 3 * len(layers) * s.step_neurons * 2 * dim * 4  # rows and two moments, fp32, per rank
    model_bytes = 4 * 135_000_000  # SmolLM2-135M in fp32, at most (the random and test models are smaller)
    if plan["source"] == "context":
        model_bytes = 4 * sum(p.numel() for p in context.base().parameters())
    elif isinstance(plan["source"], dict):
        model_bytes = 4 * 45_000_000  # the random 4-layer model: about 42M parameters, 28M of them embeddings
    needed = RANKS * (2 * replicated + 2 * model_bytes) + GB
    if not fits_in_memory(needed, f"the {RANKS}-rank run", notes):
        return None
    batches = plan_batches(context, plan, steps * MICRO_STEPS * RANKS)
    with tempfile.TemporaryDirectory(prefix="meft_bench_f_") as folder:
        workdir = Path(folder)
        if plan["source"] == "context":
            context.base().save_pretrained(workdir / "model")
            source: Any = str(workdir / "model")
        else:
            source = plan["source"]
        torch.save(batches, workdir / "batches.pt")
        spec = {
            "model": source,
            "batches": str(workdir / "batches.pt"),
            "steps": steps,
            "micro_steps": MICRO_STEPS,
            "lr": s.train_lr,
            "meft": meft,
            "variants": [{"name": "replicated", "store": {}}, {"name": "sharded", "store": {"shard": True}}],
            "out": str(workdir / "out"),
        }
        ranks = run_ranks(spec, workdir)
    variants = [summarize_variant([rank["variants"][i] for rank in ranks]) for i in range(len(spec["variants"]))]
    for v in variants:
        print(f"  {v['variant']}: {v['touched']:.0f} rows touched/step/rank, {fmt_bytes(v['total'])} between ranks "
              f"per step per rank (dense {fmt_bytes(v['dense'])})")  # fmt: skip
    return {
        "variants": variants,
        "ranks": ranks,
        "steps": steps,
        "micro_steps": MICRO_STEPS,
        "tokens": batches[0]["input_ids"].numel(),
        "layers": layers,
        "threads": ranks[0]["threads"],
        "meft": meft,
    }


# ----------------------------------------------------------------------------------------------------------------
# part 2: the NVMe tier


def aio_available() -> str | None:
    """None when DeepSpeed's async I/O op works here, else why not."""
    try:
        from deepspeed.ops.op_builder import AsyncIOBuilder

        if not AsyncIOBuilder().is_compatible(verbose=False):
            return "DeepSpeed's async_io op is not compatible here (libaio missing?)"
        import meft_ds.swap

        meft_ds.swap.aio_handle()
    except Exception as error:  # a missing libaio surfaces in several ways
        return f"DeepSpeed's async_io op cannot be built or loaded ({error.__class__.__name__}: {error})"
    return None


def mount_of(folder: Path) -> str:
    """``device (fs type) at mount point`` of the file system holding ``folder`` (Linux), or '?'."""
    try:
        mounts = [line.split()[:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return "?"
    path = str(folder.resolve())
    best = max((m for m in mounts if path == m[1] or path.startswith(m[1].rstrip("/") + "/")),
               key=lambda m: len(m[1]), default=None)  # fmt: skip
    return f"{best[0]} ({best[2]}) at {best[1]}" if best else "?"


class IoTimer:
    """Wraps a store's ``_io`` (submits) and ``_wait`` (completes): seconds spent in them, split into reads and
    writes (a wait is charged to the kind of the I/Os it completes, in proportion to their bytes)."""

    def __init__(self) -> None:
        self.seconds = {"read": 0.0, "write": 0.0}
        self._pending = {"read": 0, "write": 0}

    def instrument(self, store: Any) -> None:
        submit, wait = store._io, store._wait

        def timed_io(write: bool, buffer: torch.Tensor, name: str, first_expert: int) -> None:
            kind = "write" if write else "read"
            start = time.perf_counter()
            submit(write, buffer, name, first_expert)
            self.seconds[kind] += time.perf_counter() - start
            self._pending[kind] += buffer.numel() * buffer.element_size()

        def timed_wait() -> None:
            start = time.perf_counter()
            wait()
            elapsed = time.perf_counter() - start
            pending = sum(self._pending.values())
            for kind, count in self._pending.items():
                if pending:
                    self.seconds[kind] += elapsed * count / pending
            self._pending = {"read": 0, "write": 0}

        store._io, store._wait = timed_io, timed_wait


def nvme_settings(context: Context, plan: dict[str, Any], folder: Path, dim: int) -> tuple[dict[str, Any], int]:
    """The NVMe variant's meft settings: RAM for the expert blocks one micro-batch can probe (every token's
    ``n_probe`` experts distinct, at most E) per layer, and the number of tokens per micro-batch."""
    s = context.settings
    layers = adapter_layers(num_layers(context, plan))
    probe = meft_ds.MeftConfig.from_dict({"num_neurons": s.step_neurons, "top_k": s.top_k, **context.overrides}).n_probe
    tokens = min(NVME_TOKENS, s.seq_len)
    rows = EXPERT_ROWS  # fewer rows per expert where r is small, so that every token can probe n_probe experts
    while rows > 1 and (s.step_neurons % rows or s.step_neurons // rows < probe):
        rows //= 2
    resolved = s.step_neurons // rows
    block = (s.step_neurons // resolved) * 2 * dim * 4
    capacity = min(resolved, tokens * probe)
    ram_mb = len(layers) * (capacity * block + block // 2) / 2**20
    store = {"device": "nvme", "nvme_path": str(folder / "store"), "ram_budget_mb": ram_mb}
    values = {"num_neurons": s.step_neurons, "top_k": s.top_k, "num_experts": resolved, "layers": layers}
    return {**values, **context.overrides, "store": store}, tokens


def measure_store_io(context: Context, plan: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A few optimizer steps of a model whose stores live in ``folder``; bytes and seconds of their I/O."""
    model = plan_model(context, plan)
    dim = model.config.hidden_size
    values, tokens = nvme_settings(context, plan, folder, dim)
    model, optimizers = build_meft(model, meft_ds.MeftConfig.from_dict(values), lr=context.settings.train_lr)
    stores = [a.store for a in meft_ds.adapters(model)]
    timer = IoTimer()
    for store in stores:
        timer.instrument(store)
    batches = plan_batches(context, plan, NVME_STEPS)
    before, started, steps = meft_ds.stats(model), time.perf_counter(), []
    for step in range(NVME_STEPS):
        batch = batches[step % len(batches)]
        ids, labels = batch["input_ids"][:1, :tokens], batch["labels"][:1, :tokens]
        start, counters = time.perf_counter(), meft_ds.stats(model)
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer_step(optimizers)
        steps.append({"seconds": time.perf_counter() - start, **stats_delta(counters, meft_ds.stats(model))})
    elapsed = time.perf_counter() - started
    counted = stats_delta(before, meft_ds.stats(model))
    result = {
        "steps": steps,
        "seconds": elapsed,
        "read_seconds": timer.seconds["read"],
        "write_seconds": timer.seconds["write"],
        "bytes_read": counted["nvme_bytes_read"],
        "bytes_written": counted["nvme_bytes_written"],
        "rows_updated": counted["rows_updated"],
        "tokens": tokens,
        "layers": len(stores),
        "experts": stores[0].num_experts,
        "capacity": stores[0].capacity,
        "ram_bytes": sum(st.nbytes for st in stores),
        "store_bytes": sum(3 * st.num_rows * 2 * st.dim * 4 for st in stores),  # rows and two moments, fp32
        "dim": dim,
        "neurons": stores[0].num_rows,
    }
    result["read_gbs"] = result["bytes_read"] / result["read_seconds"] / GB if result["read_seconds"] else 0.0
    result["write_gbs"] = result["bytes_written"] / result["write_seconds"] / GB if result["write_seconds"] else 0.0
    result["step_gbs"] = (result["bytes_read"] + result["bytes_written"]) / elapsed / GB
    del model, optimizers, stores
    shutil.rmtree(folder / "store", ignore_errors=True)
    return result


def raw_aio_io(folder: Path, size: int, repeats: int = IO_REPEATS) -> dict[str, Any]:
    """Median GB/s of writing and reading one ``size``-byte file whole through the store's DeepSpeed aio handle."""
    import meft_ds.swap

    handle = meft_ds.swap.aio_handle()
    path = str(folder / "raw_aio.bin")
    source = handle.new_cpu_locked_tensor(size // 4, torch.empty(0))
    target = handle.new_cpu_locked_tensor(size // 4, torch.empty(0))
    writes, reads = [], []
    try:
        source.uniform_()
        for _ in range(repeats):
            start = time.perf_counter()
            handle.async_pwrite(source, path, 0)
            handle.wait()
            writes.append(time.perf_counter() - start)
            target.zero_()
            start = time.perf_counter()
            handle.async_pread(target, path, 0)
            handle.wait()
            reads.append(time.perf_counter() - start)
        if not torch.equal(source, target):
            raise RuntimeError("raw aio: the file read back differs from what was written")
    finally:
        handle.free_cpu_locked_tensor(source)
        handle.free_cpu_locked_tensor(target)
        with contextlib.suppress(OSError):
            os.unlink(path)
    return {"bytes": size, "write_gbs": size / statistics.median(writes) / GB,
            "read_gbs": size / statistics.median(reads) / GB}  # fmt: skip


def plain_file_io(folder: Path, size: int, repeats: int = IO_REPEATS) -> dict[str, Any]:
    """Median GB/s of a plain buffered write + fsync of one ``size``-byte file, and of a cold read of it (its pages
    dropped from the page cache with posix_fadvise first)."""
    path = folder / "plain.bin"
    source = torch.rand(size // 4).numpy()
    target = torch.empty(size // 4).numpy()
    writes, reads = [], []
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            with open(path, "wb") as file:
                file.write(memoryview(source).cast("B"))
                file.flush()
                os.fsync(file.fileno())
            writes.append(time.perf_counter() - start)
            descriptor = os.open(path, os.O_RDONLY)
            with contextlib.suppress(AttributeError, OSError):
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(descriptor)
            view = memoryview(target).cast("B")
            start = time.perf_counter()
            with open(path, "rb", buffering=0) as file:
                done = 0
                while done < size:
                    read = file.readinto(view[done:])
                    if not read:
                        break
                    done += read
            reads.append(time.perf_counter() - start)
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
    return {"bytes": size, "write_gbs": size / statistics.median(writes) / GB,
            "read_gbs": size / statistics.median(reads) / GB}  # fmt: skip


def measure_nvme(context: Context, plan: dict[str, Any], notes: list[str]) -> dict[str, Any] | None:
    why = aio_available()
    if why is not None:
        note = f"NVMe tier skipped: {why}"
        print(f"  note: {note}")
        notes.append(note)
        return None
    parent = os.environ.get("MEFT_BENCH_NVME")
    if parent:
        Path(parent).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="meft_bench_nvme_", dir=parent or None))
    try:
        store = measure_store_io(context, plan, folder)
        size = min(RAW_MAX, max(RAW_MIN, store["store_bytes"])) // 2**20 * 2**20
        raw = raw_aio_io(folder, size)
        plain = plain_file_io(folder, size)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"  NVMe store: read {store['read_gbs']:.2f} GB/s, write {store['write_gbs']:.2f} GB/s; raw aio "
          f"{raw['read_gbs']:.2f} / {raw['write_gbs']:.2f} GB/s; plain {plain['read_gbs']:.2f} / "
          f"{plain['write_gbs']:.2f} GB/s")  # fmt: skip
    return {
        "store": store,
        "raw_aio": raw,
        "plain": plain,
        "folder": str(folder.parent),
        "mount": mount_of(folder.parent),
    }


# ----------------------------------------------------------------------------------------------------------------
# the section


def table_rows(between: dict[str, Any] | None, nvme: dict[str, Any] | None) -> list[list[Any]]:
    rows: list[list[Any]] = []
    if between is not None:
        first = between["variants"][0]
        dense = first["dense"]
        rows.append([
            "between ranks", f"dense adapter r={first['neurons']} (analytic, fp32 all-reduce)", "all",
            fmt_bytes(dense), f"{first['layers']} x 2 r d x 4 B", "", "1.00x",
        ])  # fmt: skip
        for v in between["variants"]:
            breakdown = f"exchange {fmt_bytes(v['exchange'])} + routers {fmt_bytes(v['routers'])}"
            if v["foreign"]:
                breakdown = (
                    f"exchange {fmt_bytes(v['exchange'])} ({v['foreign'] / v['touched']:.0%} of the rows to the "
                    f"other rank) + routers {fmt_bytes(v['routers'])}"
                )
            if v["forward"]:
                breakdown += f" + forward {fmt_bytes(v['forward'])}"
            rows.append([
                "between ranks", f"MEFT {v['variant']} (measured)",
                f"{v['touched']:.0f} touched, {v['updated']:.0f} updated", fmt_bytes(v["total"]), breakdown, "",
                fmt_ratio(dense / v["total"]),
            ])  # fmt: skip
    if nvme is not None:
        store, raw, plain = nvme["store"], nvme["raw_aio"], nvme["plain"]
        per_step = (store["bytes_read"] + store["bytes_written"]) / len(store["steps"])
        io_ms = (store["read_seconds"] + store["write_seconds"]) / len(store["steps"]) * 1e3
        rows.append([
            "NVMe tier", f"NvmeRowStore (measured; RAM {fmt_bytes(store['ram_bytes'])} of a "
            f"{fmt_bytes(store['store_bytes'])} store)", f"{store['rows_updated'] / len(store['steps']):.0f} updated",
            fmt_bytes(per_step), f"I/O {io_ms:.0f} ms of a {store['seconds'] / len(store['steps']) * 1e3:.0f} ms step; "
            f"whole step {store['step_gbs']:.2f} GB/s", f"{store['read_gbs']:.2f} / {store['write_gbs']:.2f}",
            f"{fmt_ratio(store['read_gbs'] / raw['read_gbs'])} / {fmt_ratio(store['write_gbs'] / raw['write_gbs'])}",
        ])  # fmt: skip
        rows.append([
            "NVMe tier", f"DeepSpeed aio handle, one {fmt_bytes(raw['bytes'])} file (O_DIRECT)", "",
            fmt_bytes(raw["bytes"]),
            "same handle and folder as the store", f"{raw['read_gbs']:.2f} / {raw['write_gbs']:.2f}", "1.00x / 1.00x",
        ])  # fmt: skip
        rows.append([
            "NVMe tier", "plain file: buffered write + fsync, cold read", "", fmt_bytes(plain["bytes"]),
            "same folder", f"{plain['read_gbs']:.2f} / {plain['write_gbs']:.2f}",
            f"{fmt_ratio(plain['read_gbs'] / raw['read_gbs'])} / {fmt_ratio(plain['write_gbs'] / raw['write_gbs'])}",
        ])  # fmt: skip
    return rows


def run(context: Context) -> Section:
    s = context.settings
    notes: list[str] = []
    plan = model_plan(context)
    between = measure_between_ranks(context, plan, notes)
    nvme = measure_nvme(context, plan, notes)
    rows = table_rows(between, nvme)
    what = (
        f"Per rank and per optimizer step: the bytes {RANKS} data-parallel ranks exchange to keep MEFT's row stores in "
        f"step, replicated vs sharded stores, against what a dense adapter of the same r all-reduces; and the read "
        f"and write GB/s of the NVMe tier (NvmeRowStore) against a raw DeepSpeed async I/O handle and a plain file in "
        f"the same folder. Model: {plan['label']}; adapters on its last {ADAPTER_LAYERS} layers, r={s.step_neurons}, "
        f"K={s.top_k}."
    )
    how_parts = []
    if between is not None:
        v0 = between["variants"][0]
        how_parts.append(
            f"Bytes between ranks: {RANKS} processes (python -m torch.distributed.run --nproc_per_node {RANKS} "
            f"launch/bench/scaleout_driver.py SPEC.json; gloo, {between['threads']} torch thread per rank) each run "
            f"meft_ds.initialize (ZeRO stage 0, fp32, no clipping) and {between['steps']} optimizer steps of "
            f"{between['micro_steps']} micro-batches of {between['tokens']} tokens per rank, once with replicated "
            'stores and once with {"store": {"shard": true}}. Measured: the deltas of meft_ds.stats(model)'
            "['bytes_between_ranks'] (what the rank put into the collectives: at the optimizer step the touched row "
            "ids, int64, and their fp32 gradients, over the ranks' union for replicated stores or sent to the owners "
            "for sharded ones, a rank's own share included; with sharded stores also, during the forward, the routing "
            "all-gathers and the rows fetched from their owners), averaged over ranks and steps; 'touched' = rows "
            "holding a gradient on the rank before the exchange, 'updated' = rows its sparse Adam updated. Added: "
            f"the routers' gradients, which the engine all-reduces ({fmt_bytes(v0['routers'])}, analytic: their fp32 "
            f"bytes). Dense: analytic, {v0['layers']} layers x 2 r d x 4 bytes (fp32 gradients, d={v0['dim']}; bf16 "
            "would be half), what each rank puts into its gradient all-reduce (a ring all-reduce over 2 ranks sends "
            "exactly that per rank)."
        )
    if nvme is not None:
        st = nvme["store"]
        how_parts.append(
            f'NVMe: in the benchmark\'s process, adapters with "store": {{"device": "nvme"}} (E={st["experts"]} '
            f"experts of {st['neurons'] // st['experts']} rows, the unit of I/O; a RAM cache of {st['capacity']} "
            f"blocks per layer, what one micro-batch of {st['tokens']} tokens can probe) train {len(st['steps'])} "
            "optimizer steps (SparseRowAdam; AdamW for the routers). Every store's _io (submit) and _wait calls are "
            "timed; read/write GB/s = the counters nvme_bytes_read/nvme_bytes_written over the time spent in them "
            "(the whole-step figure divides by the whole steps' time). Baselines in the same folder "
            f"({nvme['mount']}), median of {IO_REPEATS}: one file written and read whole through the same DeepSpeed "
            "aio handle (1 MiB blocks, queue depth 32, O_DIRECT), and a plain buffered write + fsync and a cold "
            "buffered read (pages dropped with posix_fadvise DONTNEED first)."
        )
    sizes = [v for v in between["variants"]] if between is not None else []
    met = bool(sizes) and all(v["total"] < v["dense"] for v in sizes)
    verdict_parts = []
    if sizes:
        verdict_parts.append(
            "Per rank per optimizer step: "
            + ", ".join(
                f"{v['variant']} {fmt_bytes(v['total'])} (dense ÷ it = {fmt_ratio(v['dense'] / v['total'])})"
                for v in sizes
            )
            + f" vs the dense adapter's {fmt_bytes(sizes[0]['dense'])}."
        )
        verdict_parts += [
            f"Of the {v['variant']} stores' bytes, {fmt_bytes(v['forward'])} move during the forward (routing "
            f"all-gathers, rows fetched from their owners), the price of holding 1/{RANKS} of the rows per rank."
            for v in sizes
            if v["forward"]
        ]
    else:
        verdict_parts.append("The 2-rank run was skipped.")
    if nvme is not None:
        st, raw = nvme["store"], nvme["raw_aio"]
        verdict_parts.append(
            f"NVMe store I/O read {st['read_gbs']:.2f} GB/s, write {st['write_gbs']:.2f} GB/s vs raw aio "
            f"{raw['read_gbs']:.2f} / {raw['write_gbs']:.2f} GB/s on the same folder."
        )
    return Section(
        key="f",
        title="Scale out: bytes between ranks, NVMe tier GB/s",
        what=what,
        how=" ".join(how_parts) or "Nothing could be measured on this machine (see the notes).",
        columns=[
            "part",
            "variant",
            "rows / step (per rank)",
            "bytes / step (per rank)",
            "breakdown",
            "GB/s read / write",
            "dense ÷ this, or this ÷ raw aio",
        ],
        rows=rows,
        target=(
            "MEFT's bytes between ranks per optimizer step (replicated and sharded, all counted) below a dense "
            "adapter's gradient all-reduce of the same r; NVMe GB/s reported next to the raw aio handle's "
            "(no threshold)"
        ),
        met=met if sizes else None,
        verdict=" ".join(verdict_parts),
        notes=notes,
        data={"between_ranks": between, "nvme": nvme, "model": plan["label"]},
    )


def plot(section: Section, path: str) -> None:
    import matplotlib.pyplot as plt

    between, nvme = section.data["between_ranks"], section.data["nvme"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 8))
    if between is not None:
        variants = between["variants"]
        labels = ["dense (analytic)"] + [f"MEFT {v['variant']}" for v in variants]
        left.bar([0], [variants[0]["dense"] / MB], color="gray")
        bottom = [0.0] * len(variants)
        for part, color in (("exchange", "tab:blue"), ("forward", "tab:orange"), ("routers", "tab:green")):
            values = [v[part] / MB for v in variants]
            left.bar(range(1, len(variants) + 1), values, bottom=bottom, color=color, label=part)
            bottom = [b + x for b, x in zip(bottom, values, strict=True)]
        left.set_xticks(range(len(labels)), labels)
        left.set_ylabel("MB per rank per optimizer step")
        left.legend(fontsize=8)
    else:
        left.text(0.5, 0.5, "2-rank run skipped", ha="center")
    left.set_title("f. Bytes between ranks per optimizer step")
    if nvme is not None:
        names = ["NvmeRowStore", "raw aio", "plain file"]
        parts = [nvme["store"], nvme["raw_aio"], nvme["plain"]]
        xs = range(len(names))
        right.bar([x - 0.2 for x in xs], [p["read_gbs"] for p in parts], 0.4, label="read")
        right.bar([x + 0.2 for x in xs], [p["write_gbs"] for p in parts], 0.4, label="write")
        right.set_xticks(list(xs), names)
        right.set_ylabel("GB/s")
        right.legend(fontsize=8)
    else:
        right.text(0.5, 0.5, "NVMe tier skipped (no async I/O)", ha="center")
    right.set_title("f. NVMe tier read / write GB/s")
    figure.subplots_adjust(bottom=0.33)
    figure_footer(figure, section.how, section.command)
    figure.savefig(path, dpi=110)
    plt.close(figure)
