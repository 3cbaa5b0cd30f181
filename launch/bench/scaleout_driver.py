"""The ranks of experiment f (launch/bench/scaleout.py): run under ``torchrun --nproc_per_node 2``.

    python -m torch.distributed.run --nproc_per_node 2 launch/bench/scaleout_driver.py SPEC.json

Every rank loads the spec's frozen base model (``"builtin"``: SmolLM2-135M-Instruct; else a ``save_pretrained`` folder)
and, per variant of the spec (a ``"store"`` setting and meft overrides of its own), trains a private copy built by
``meft_ds.initialize``; rank ``w`` of ``W`` takes micro-batch ``(step * micro_steps + m) * W + w``. It records the
deltas of ``meft_ds.stats(model)`` over the micro-steps and over the boundary's ``engine.step()``, the rows holding a
gradient before that step (and how many of them another rank owns), and after the last step the process's
proportional set size (its share of every page it maps: the ranks' add up to what the node holds for them) and its
stores' bytes. Writes ``rank_<w>.json`` into the spec's ``out`` folder.
"""

from __future__ import annotations

import copy
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import deepspeed
import torch
from deepspeed import comm as dist
from transformers import AutoModelForCausalLM

import meft_ds
from bench.common import proc_bytes, stats_delta
from meft_ds.models import load_model_and_tokenizer


def load_base(source: str) -> torch.nn.Module:
    model = load_model_and_tokenizer(None)[0] if source == "builtin" else AutoModelForCausalLM.from_pretrained(source)
    return model.eval().requires_grad_(False)


def rows_with_grads(model: torch.nn.Module) -> tuple[int, int]:
    """Rows holding a gradient on this rank before the exchange (all layers), and how many of them another rank
    owns (sharded stores; 0 for replicated ones)."""
    touched = foreign = 0
    for adapter in meft_ds.adapters(model):
        adapter.collect_row_grads()
        accumulated = adapter.store.accumulated_grads()
        if accumulated is None:
            continue
        touched += accumulated[0].numel()
        if adapter.store.is_shard:
            foreign += int((adapter.store.owners(accumulated[0]) != adapter.store.rank).sum())
    return touched, foreign


def run_variant(base: torch.nn.Module, spec: dict[str, Any], variant: dict[str, Any], batches: list) -> dict:
    rank, world, micro_steps = dist.get_rank(), dist.get_world_size(), spec["micro_steps"]
    config = {
        "train_micro_batch_size_per_gpu": batches[0]["input_ids"].shape[0],
        "gradient_accumulation_steps": micro_steps,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "optimizer": {"type": "AdamW", "params": {"lr": spec["lr"]}},
        "zero_optimization": {"stage": 0},
    }
    meft = {**spec["meft"], **variant.get("meft", {}), "store": variant["store"]}
    model = copy.deepcopy(base)
    engine, *_ = meft_ds.initialize(model=model, config=config, meft=meft)
    layers = meft_ds.adapters(model)
    router_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    steps = []
    for step in range(spec["steps"]):
        start, before = time.perf_counter(), meft_ds.stats(model)
        for micro in range(micro_steps):
            batch = batches[((step * micro_steps + micro) * world + rank) % len(batches)]
            engine.backward(engine(input_ids=batch["input_ids"], labels=batch["labels"]).loss)
            if micro < micro_steps - 1:
                engine.step()  # not a boundary: the engine only counts the micro-step
        middle = meft_ds.stats(model)
        touched, foreign = rows_with_grads(model)
        engine.step()  # the boundary: exchange of row gradients, engine step, sparse Adam
        after = meft_ds.stats(model)
        steps.append({"micro": stats_delta(before, middle), "step": stats_delta(middle, after), "touched": touched,
                      "foreign": foreign})  # fmt: skip
        print(f"rank {rank} {variant['name']} step {step}: {time.perf_counter() - start:.1f} s", flush=True)
    result = {
        "variant": variant["name"],
        "layers": [a.layer_index for a in layers],
        "dim": layers[0].dim,
        "num_neurons": layers[0].store.num_rows,
        "num_experts": layers[0].config.num_experts,
        "rows_held": sum(a.store.rows.shape[0] for a in layers),
        "store_bytes": sum(a.store.nbytes for a in layers),
        # PSS: this process's share of every page it maps (its RSS where smaps_rollup is missing)
        "pss_bytes": proc_bytes("/proc/self/smaps_rollup", "Pss") or proc_bytes("/proc/self/status", "VmRSS") or 0,
        "row_dtype": meft.get("row_dtype", "auto"),
        "router_params": router_params,
        "steps": steps,
        "shard_default": bool(layers[0].store.is_shard and "shard" not in variant["store"]),
        "final": meft_ds.stats(model),
    }
    del engine, model, layers
    gc.collect()
    return result


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    deepspeed.init_distributed(dist_backend="gloo")
    rank, base, batches = dist.get_rank(), load_base(spec["model"]), torch.load(spec["batches"])
    results = [run_variant(base, spec, variant, batches) for variant in spec["variants"]]
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    payload = {"rank": rank, "threads": torch.get_num_threads(), "variants": results}
    (out / f"rank_{rank}.json").write_text(json.dumps(payload, indent=1))
    dist.barrier()
    dist.destroy_process_group()  # while the interpreter is whole (meft_ds.training.run_cli says why)
    print(f"rank {rank}: OK", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
