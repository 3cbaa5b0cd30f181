"""The ranks of experiment f (launch/bench/scaleout.py): run under ``torchrun --nproc_per_node 2``.

    python -m torch.distributed.run --nproc_per_node 2 launch/bench/scaleout_driver.py SPEC.json

Every rank loads the same frozen base model (the spec names it: ``"builtin"`` = the real SmolLM2-135M-Instruct, a
folder written by ``save_pretrained``, or ``{"random": {...LlamaConfig...}}``), and for each variant of the spec (a
``"store"`` setting of the meft section: replicated or sharded) builds a private copy with ``meft_ds.initialize``
(ZeRO stage 0, fp32, gloo, no gradient clipping) and trains ``steps`` optimizer steps of ``micro_steps`` micro-batches
each; rank ``w`` of ``W`` takes micro-batch ``(step * micro_steps + m) * W + w`` of the spec's token file. Around
every part it records the deltas of ``meft_ds.stats(model)``: the micro-steps (forward + backward: with a sharded
store, routing and row fetches from the owners) and ``engine.step()`` at the boundary (the plugin's exchange of row
gradients, then the sparse Adam). Before the step it also counts the rows holding a gradient on this rank (over all
adapter layers) and how many of them another rank owns; after the last step, the process's proportional set size
(PSS, its share of every page it maps: the ranks' PSS add up to what the node holds for them) and its stores' bytes.
A variant may carry meft overrides of its own (``"meft": {"row_dtype": "bf16"}``). Writes ``rank_<w>.json`` into the
spec's ``out`` folder.
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

import meft_ds
from bench.common import proc_bytes, stats_delta


def load_base(source: Any) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    if source == "builtin":
        from meft_ds.models import load_model_and_tokenizer

        model, _ = load_model_and_tokenizer(None)
    elif isinstance(source, dict):
        torch.manual_seed(0)  # every rank builds the same random model
        model = AutoModelForCausalLM.from_config(LlamaConfig(**source["random"]))
    else:
        model = AutoModelForCausalLM.from_pretrained(source)
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
        ids = accumulated[0]
        touched += ids.numel()
        if adapter.store.is_shard:
            foreign += int((adapter.store.owners(ids) != adapter.store.rank).sum())
    return touched, foreign


def pss_bytes() -> int:
    """This process's proportional set size (Linux ``smaps_rollup``; its RSS where that is missing)."""
    return proc_bytes("/proc/self/smaps_rollup", "Pss") or proc_bytes("/proc/self/status", "VmRSS") or 0


def run_variant(base: torch.nn.Module, spec: dict[str, Any], variant: dict[str, Any], batches: list) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    config = {
        "train_micro_batch_size_per_gpu": batches[0]["input_ids"].shape[0],
        "gradient_accumulation_steps": spec["micro_steps"],
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
        start = time.perf_counter()
        before = meft_ds.stats(model)
        for micro in range(spec["micro_steps"]):
            batch = batches[((step * spec["micro_steps"] + micro) * world + rank) % len(batches)]
            loss = engine(input_ids=batch["input_ids"], labels=batch["labels"]).loss
            engine.backward(loss)
            if micro < spec["micro_steps"] - 1:
                engine.step()  # not a boundary: the engine only counts the micro-step
        middle = meft_ds.stats(model)
        touched, foreign = rows_with_grads(model)
        engine.step()  # the boundary: exchange of row gradients, engine step, sparse Adam
        after = meft_ds.stats(model)
        steps.append({
            "micro": stats_delta(before, middle), "step": stats_delta(middle, after), "touched": touched,
            "foreign": foreign, "seconds": time.perf_counter() - start, "loss": float(loss.detach()),
        })  # fmt: skip
        print(f"rank {rank} {variant['name']} step {step}: {steps[-1]['seconds']:.1f} s, {touched} rows", flush=True)
    result = {
        "variant": variant["name"],
        "store": variant["store"],
        "layers": [a.layer_index for a in layers],
        "dim": layers[0].dim,
        "num_neurons": layers[0].store.num_rows,
        "num_experts": layers[0].config.num_experts,
        "rows_held": sum(a.store.rows.shape[0] for a in layers),
        "store_bytes": sum(a.store.nbytes for a in layers),
        "pss_bytes": pss_bytes(),
        "row_dtype": meft.get("row_dtype", "auto"),
        "shard_default": bool(layers[0].store.is_shard and "shard" not in variant["store"]),
        "router_params": router_params,
        "steps": steps,
        "final": meft_ds.stats(model),
    }
    del engine, model, layers
    gc.collect()
    return result


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    base = load_base(spec["model"])
    batches = torch.load(spec["batches"])
    results = [run_variant(base, spec, variant, batches) for variant in spec["variants"]]
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    payload = {"rank": rank, "world": world, "threads": torch.get_num_threads(), "variants": results}
    (out / f"rank_{rank}.json").write_text(json.dumps(payload, indent=1))
    dist.barrier()
    print(f"rank {rank}: OK", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
