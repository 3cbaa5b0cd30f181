"""The GPU check's generation part (run by ``launch/gpu_bench.py`` on the MEFT model it trained): greedy
``generate()`` with routing on the host (the training path) and on the device (``meft_ds.for_inference``), tokens/s,
whether the outputs are identical and the bytes each moves per generated token; then both paths' routing on identical
inputs, layer by layer (the rows each token chose, the adapter's output), in the model's dtype and again in fp32, which
tells rounding from a defect where the outputs differ."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from bench.common import fmt_bytes
from deepspeed.accelerator import get_accelerator

import meft_ds
from meft_ds.adapter import SparseKeyExpertAdapter
from meft_ds.inference import DeviceRows


def generation(model: torch.nn.Module, vocab: int, device: torch.device, dry_run: bool) -> dict[str, Any]:
    """Greedy ``generate()`` of the trained MEFT model, routing on the host and then on the device: tokens/s (median of
    2 calls after a warm-up), peak device memory, bytes per generated token, the device bytes of the rows."""
    accelerator = get_accelerator()
    prompts, prompt_length, new_tokens = 2, 8 if dry_run else 32, 8 if dry_run else 32
    ids = torch.randint(0, vocab, (prompts, prompt_length), generator=torch.Generator().manual_seed(1)).to(device)
    model.eval()
    outputs, paths = {}, []
    for path in ("host", "device"):
        if path == "device":
            meft_ds.for_inference(model)
        accelerator.reset_peak_memory_stats()
        before = meft_ds.stats(model)
        seconds = []
        for _ in range(3):  # a warm-up call, then two timed
            started = time.perf_counter()
            outputs[path] = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, pad_token_id=0,
            )  # fmt: skip
            accelerator.synchronize()
            seconds.append(time.perf_counter() - started)
        after = meft_ds.stats(model)
        tokens = prompts * new_tokens
        paths.append({
            "path": path,
            "tokens_per_s": tokens / statistics.median(seconds[1:]),
            "peak_device_gib": accelerator.max_memory_allocated() / 2**30,
            "bytes_to_device_per_token": (after["bytes_to_device"] - before["bytes_to_device"]) / (3 * tokens),
            "bytes_to_host_per_token": (after["bytes_to_host"] - before["bytes_to_host"]) / (3 * tokens),
            "row_device_bytes": sum(a.serving.nbytes for a in meft_ds.adapters(model) if a.serving is not None),
        })  # fmt: skip
        print(f"  generate, routing on the {path}: {paths[-1]['tokens_per_s']:.1f} tokens/s", flush=True)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    agreement = {dtype: routing_agreement(model, ids)}
    model.float()  # the same comparisons in fp32: what is left is a defect, not rounding
    meft_ds.for_inference(model)
    agreement["float32"] = routing_agreement(model, ids)
    meft_ds.for_training(model)
    differ = (outputs["host"] != outputs["device"])[:, prompt_length:]
    agreeing = torch.where(differ.any(1), differ.int().argmax(1), new_tokens)  # new tokens before the first difference
    return {
        "prompts": f"{prompts} x {prompt_length} random tokens",
        "new_tokens": new_tokens,
        "identical": torch.equal(outputs["host"], outputs["device"]),
        "agreeing_tokens": int(agreeing.min()),
        "next_token_logits_rel_diff": agreement[dtype]["next_token_logits_rel_diff"],
        "paths": paths,
        "speedup": paths[1]["tokens_per_s"] / paths[0]["tokens_per_s"],
        "routing_agreement": agreement,
    }


def routing_agreement(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, Any]:
    """Routing on the host against routing on the device (:func:`meft_ds.for_inference` placed the rows) on
    identical inputs: every layer's adapter input is captured in one forward of ``ids`` on the host path; then, per
    layer, both paths' chosen rows (each token's K) and outputs for that input. Ends with the rows on the device."""
    found = meft_ds.adapters(model)
    servings = [adapter.serving for adapter in found]
    inputs: dict[int, torch.Tensor] = {}
    chosen: dict[str, list[torch.Tensor]] = {"host": [], "device": []}
    begin, route, over_rows = SparseKeyExpertAdapter.begin, SparseKeyExpertAdapter._route, DeviceRows._over_rows

    def captured_begin(adapter: Any, hidden: torch.Tensor) -> Any:
        inputs.setdefault(id(adapter), hidden.detach().clone())
        return begin(adapter, hidden)

    def recorded_route(adapter: Any, pending: Any) -> Any:
        routing = route(adapter, pending)
        chosen["host"].append(routing.row_ids[routing.union_pos])
        return routing

    def recorded_over_rows(serving: Any, x: torch.Tensor, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        chosen["device"].append(rows.cpu())
        return over_rows(serving, x, logits, rows)

    tokens_same, rows_shared, output_diffs = [], [], []
    try:
        SparseKeyExpertAdapter.begin, SparseKeyExpertAdapter._route, DeviceRows._over_rows = (
            captured_begin, recorded_route, recorded_over_rows
        )  # fmt: skip
        with torch.no_grad():
            meft_ds.for_training(model)
            logits = {"host": model(input_ids=ids).logits[:, -1].float()}  # the forward that captures the inputs
            SparseKeyExpertAdapter.begin = begin
            for adapter, serving in zip(found, servings, strict=True):
                x = inputs[id(adapter)]
                chosen["host"].clear()
                chosen["device"].clear()
                adapter.serving = None
                host_out = adapter(x).float()
                adapter.serving = serving
                serving.mirror_host = False  # the accelerator's routine, also on a CPU (the dry run)
                device_out = adapter(x).float()
                host_rows = chosen["host"][0].sort(1).values
                device_rows = torch.cat(chosen["device"]).sort(1).values
                tokens_same.append((host_rows == device_rows).all(1).float().mean().item())
                shared = (host_rows.unsqueeze(2) == device_rows.unsqueeze(1)).any(2).float().mean().item()
                rows_shared.append(shared)
                output_diffs.append(((device_out - host_out).norm() / host_out.norm()).item())
    finally:
        SparseKeyExpertAdapter.begin, SparseKeyExpertAdapter._route, DeviceRows._over_rows = begin, route, over_rows
        for adapter, serving in zip(found, servings, strict=True):
            adapter.serving = serving
    with torch.no_grad():
        logits["device"] = model(input_ids=ids).logits[:, -1].float()
    result = {
        "layers": len(found),
        "min_tokens_same_rows": min(tokens_same),
        "mean_tokens_same_rows": statistics.mean(tokens_same),
        "min_rows_shared": min(rows_shared),
        "max_output_rel_diff": max(output_diffs),
        "median_output_rel_diff": statistics.median(output_diffs),
        "next_token_logits_rel_diff": float((logits["device"] - logits["host"]).norm() / logits["host"].norm()),
    }
    print(f"  routing agreement, {next(model.parameters()).dtype}: {result}", flush=True)
    return result


def markdown(generated: dict[str, Any]) -> list[str]:
    """The generation tables (lines of gpu_bench.md)."""
    lines = [
        "",
        f"Greedy generate() of the trained MEFT model, {generated['prompts']}, {generated['new_tokens']} new tokens; "
        f"outputs of both paths identical: {'yes' if generated['identical'] else 'no'} (the first "
        f"{generated['agreeing_tokens']} new tokens agree; the prompts' next-token logits differ by "
        f"{generated['next_token_logits_rel_diff']:.1e}, relative).",
        "",
        "Host against device routing on identical inputs (each layer's adapter input captured on the host path; "
        "per layer, the share of tokens whose K chosen rows are the same set, the adapter outputs' relative "
        "difference; then the prompts' next-token logits):",
        "",
        "| dtype | tokens with the same rows (min / mean over layers) | rows shared (min) "
        "| output rel. diff (median / max) | next-token logits rel. diff |",
        "|---|---|---|---|---|",
        *(
            f"| {dtype} | {a['min_tokens_same_rows']:.4f} / {a['mean_tokens_same_rows']:.4f} | "
            f"{a['min_rows_shared']:.4f} | {a['median_output_rel_diff']:.1e} / {a['max_output_rel_diff']:.1e} | "
            f"{a['next_token_logits_rel_diff']:.1e} |"
            for dtype, a in generated["routing_agreement"].items()
        ),
        "",
        "| generate() | tokens/s | speed-up | peak device GiB | rows on the device | host->device / token "
        "| device->host / token |",
        "|---|---|---|---|---|---|---|",
    ]
    first = generated["paths"][0]["tokens_per_s"]
    for p in generated["paths"]:
        label = {"host": "routing on the host (training path)", "device": "meft_ds.for_inference"}[p["path"]]
        lines.append(
            f"| {label} | {p['tokens_per_s']:.1f} | {p['tokens_per_s'] / first:.2f}x | {p['peak_device_gib']:.2f} "
            f"| {fmt_bytes(p['row_device_bytes'])} | {fmt_bytes(p['bytes_to_device_per_token'])} "
            f"| {fmt_bytes(p['bytes_to_host_per_token'])} |"
        )
    return lines
