"""Evaluate a base model, and the same model with an exported meft_ds adapter, on held-out examples (or with the LoRA
or parallel adapter of a ``launch/train.py --method lora|parallel_adapter`` run, its --output_dir as --adapter; a
PEFT model's LoRA saved beside MEFT's, in the export's ``peft/``, loads with it).

    python launch/evaluate.py --adapter outputs/meft-facts
    python launch/evaluate.py --adapter outputs/meft-facts --prompt "Where was Drical Calxan born?"
    python launch/evaluate.py --model HuggingFaceTB/SmolLM2-135M-Instruct --adapter out --dataset squad --limit 500

Greedy decoding; exact match and F1 for QA (facts, nq, squad), IoU of the API calls for ToolBench, final-answer accuracy
for GSM8K; a plain-text file (``{"text": ...}`` rows) by its loss per token and perplexity. Prints the base model's
scores ("before") and, with ``--adapter``, the adapted model's ("after"); ``--output`` also writes them, with every
prediction, as JSON. The model's name, the dtype it computes in and the held-out set (with the built-in facts set's size
and seed) come from the adapter's ``results.json`` when ``--model``, ``--dtype``, ``--dataset``, ``--facts`` /
``--seed``, ``--split``, ``--dataset_config``, ``--max_length`` are not given, so the scores are the training run's. No
GPU needed; the model runs on DeepSpeed's accelerator. The adapted model is served from the device
(``meft_ds.for_inference``: rows on the device, routed there, no host copy per token and layer; the same greedy answers
as the training path, which ``--host_routing`` uses instead).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from deepspeed.accelerator import get_accelerator

import meft_ds
from meft_ds.baselines import exported_method, load_baseline
from meft_ds.data import (
    DATASETS,
    FORMATS,
    Example,
    dataset_sources,
    load_examples,
    single_split,
    split_names_apply,
    split_off,
)
from meft_ds.ds_config import DTYPE_NAMES, compute_dtype, fit_precision_to_cpu, resolve_auto
from meft_ds.evaluation import evaluate_examples, format_scores
from meft_ds.export_load import read_adapter_config
from meft_ds.files import write_json_atomic
from meft_ds.models import BUILTIN_MODEL, load_model_and_tokenizer
from meft_ds.ops import cpu_kernels
from meft_ds.training import UsageError, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="hub id, local folder, .gguf file (default: the adapter's, else the built-in)")
    parser.add_argument(
        "--dtype",
        choices=["auto", *DTYPE_NAMES.values()],
        default="auto",
        help="dtype the model computes in (auto: the adapter's training run's, else bf16 on a GPU that supports it "
        "and on a CPU with AMX, fp32 on other CPUs)",
    )
    parser.add_argument("--adapter", type=Path, help="an exported adapter (the --output_dir of launch/train.py)")
    parser.add_argument(
        "--dataset",
        help=f"one of {', '.join(DATASETS)} (its eval split), a file, a dataset folder or a hub id (its --split) "
        "(default: the adapter's run's held-out set, else facts)",
    )
    parser.add_argument(
        "--prompt",
        action="append",
        help="ask this question instead of a held-out set, and print the answers (repeatable)",
    )
    parser.add_argument("--dataset_format", choices=FORMATS, help="schema of the dataset's rows (default: inferred)")
    parser.add_argument(
        "--split", help="the held-out split of a hub id or dataset folder (default: the run's --eval_split, else test)"
    )
    parser.add_argument("--dataset_config", help="the config of a hub id or dataset folder (default: the run's)")
    parser.add_argument("--facts", type=int, help="--dataset facts: how many facts (default: the adapter's run's, 150)")
    parser.add_argument("--limit", "--eval_limit", type=int, default=200, help="evaluate the first N examples (0: all)")
    parser.add_argument("--batch_size", "--eval_batch_size", type=int, default=32)
    parser.add_argument("--max_new_tokens", type=int, help="generation budget (default: by task)")
    parser.add_argument(
        "--max_length", type=int, help="plain text (scored by its loss): tokens per window (default: the run's, 256)"
    )
    parser.add_argument("--no_base", action="store_true", help="skip the base model's evaluation")
    parser.add_argument("--output", type=Path, help="write the scores and predictions to this JSON file")
    parser.add_argument("--seed", type=int, help="seed of the built-in facts set (default: the adapter's run's, 0)")
    parser.add_argument(
        "--host_routing", action="store_true", help="route on the host as training does (slower; the same answers)"
    )
    args = parser.parse_args(argv)
    for name in ("batch_size", "max_new_tokens", "max_length"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be at least 1, got {value}")
    if args.limit < 0:
        parser.error(f"--limit must be >= 0, got {args.limit}")
    if args.prompt and (
        args.dataset or args.dataset_format or args.split or args.dataset_config or args.facts is not None
    ):
        parser.error("--prompt asks its own questions: drop --dataset, --dataset_format, --split, --dataset_config "
                     "and --facts")  # fmt: skip
    if args.no_base and args.adapter is None:
        parser.error("--no_base leaves nothing to evaluate. Fix: pass --adapter, or drop --no_base.")
    if args.output is not None and args.output.is_dir():
        parser.error(f"--output {args.output} is a folder. Fix: name a JSON file, e.g. {args.output / 'scores.json'}.")
    return args


def trained_with(args: argparse.Namespace) -> dict[str, Any]:
    """What the run recorded (its ``results.json``): the --adapter's run, or the run that wrote --model (a ``--method
    full`` run's folder); nothing for another model or an export without it."""
    run = args.adapter or (Path(args.model) if args.model else None)
    results = run / "results.json" if run is not None else None
    return json.loads(results.read_text()) if results is not None and results.is_file() else {}


def held_out(args: argparse.Namespace, trained: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The dataset to evaluate on and how to load it (facts count, seed, split and config names): those given, else
    the ones the adapter's run held out (the part of its --dataset's training split its --eval_size held out, its
    --eval_dataset, else the held-out split of its --dataset unless a file, with its --facts and --seed: another size
    or seed of the built-in facts set asks about other people; its --eval_split and --dataset_config), else the
    built-in facts. A run on a mixture held out its first source's."""
    run_dataset = dataset_sources(trained["dataset"])[0] if trained.get("dataset") else None
    names = run_dataset is None or split_names_apply(run_dataset, trained["dataset"])  # as the run loaded it
    run_split, run_config = (trained.get("dataset_split"), trained.get("dataset_config")) if names else (None, None)
    if args.dataset is None and args.split is None and trained.get("eval_size") is not None:
        facts = trained.get("facts") if run_dataset == "facts" else None
        config_name = args.dataset_config or run_config
        return run_dataset, dict(facts=facts, seed=trained.get("seed", 0), split_name=run_split,
                                 config_name=config_name, eval_size=trained["eval_size"])  # fmt: skip
    run_held_out = trained.get("eval_dataset") or (
        None if run_dataset is None or single_split(run_dataset) else run_dataset
    )
    if args.dataset is None and run_dataset is not None and run_held_out is None:
        raise UsageError(f"--adapter {args.adapter}: its run trained on {run_dataset} and held no file out (no "
                         "--eval_dataset). Fix: pass --dataset with a held-out file.")  # fmt: skip
    dataset = args.dataset or run_held_out or "facts"
    run_facts = dataset == "facts" == run_held_out  # the run's facts set: its size and seed apply
    facts = args.facts if args.facts is not None else trained.get("facts") if run_facts else None
    seed = args.seed if args.seed is not None else trained.get("seed", 0) if run_facts else 0
    split_name = args.split or (trained.get("eval_split") if dataset == run_held_out else None)
    config_name = args.dataset_config or (run_config if dataset == run_dataset else None)
    return dataset, dict(facts=facts, seed=seed, split_name=split_name, config_name=config_name)


def describe(dataset: str, facts: int | None, seed: int) -> str:
    """The held-out set as the output names it: a built-in set's split (its size and seed for facts); a file by its
    path (all of it held out)."""
    if dataset not in DATASETS:
        return dataset
    details = ["eval split"] + ([f"{facts} facts"] if facts else []) + ([f"seed {seed}"] if dataset == "facts" else [])
    return f"{dataset} ({', '.join(details)})"


def model_name(args: argparse.Namespace, trained: dict[str, Any]) -> str:
    """--model, else the model the adapter was trained on (its run's results.json), else the built-in model."""
    return args.model or trained.get("model") or BUILTIN_MODEL


def model_dtype(args: argparse.Namespace, trained: dict[str, Any]) -> torch.dtype:
    """--dtype, else the dtype the adapter's run trained in (its results.json), else what ds_configs/meft.json's
    ``"bf16": {"enabled": "auto"}`` gives on this machine (bf16 on a GPU that supports it and on a CPU with AMX, fp32
    on other CPUs)."""
    by_name = {name: dtype for dtype, name in DTYPE_NAMES.items()}
    if args.dtype != "auto":
        return by_name[args.dtype]
    if trained.get("dtype") in by_name:
        return by_name[trained["dtype"]]
    config = resolve_auto({"bf16": {"enabled": "auto"}})
    fit_precision_to_cpu(config)
    return compute_dtype(config)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # every input is checked before the model loads
    trained = trained_with(args)
    if args.prompt:
        dataset, facts, seed, described = None, None, None, None
        examples = [Example(prompt, answers=[]) for prompt in args.prompt]  # nothing to score: answers are printed
    else:
        dataset, loading = held_out(args, trained)
        facts, seed, eval_size = loading["facts"], loading["seed"], loading.pop("eval_size", None)
        file_format = None if dataset in DATASETS else args.dataset_format
        if eval_size is None:
            split = "train" if single_split(dataset) else "eval"  # a file is all held out
            examples = load_examples(dataset, split, format=file_format, limit=args.limit or None, **loading)
            described = describe(dataset, facts, seed)
        else:  # the run's own draw from its training split
            _, examples = split_off(load_examples(dataset, format=file_format, **loading), eval_size, seed=seed)
            examples = examples[: args.limit or None]
            described = f"{dataset} (--eval_size {eval_size:g} of its training examples, seed {seed})"
    method = exported_method(args.adapter) if args.adapter is not None else None
    if method == "full":
        raise UsageError(f"--adapter {args.adapter}: holds a whole model (a --method full run). Fix: evaluate it as "
                         f"--model {args.adapter}, without --adapter.")  # fmt: skip
    if method == "meft":
        read_adapter_config(args.adapter)
    if args.output is not None:  # made now: a folder that cannot be made fails here, not after the evaluation
        try:
            args.output.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UsageError(f"--output {args.output}: cannot create its folder ({error}). Fix: choose a "
                             "writable path.") from None  # fmt: skip
    name = model_name(args, trained)
    dtype = model_dtype(args, trained)
    max_length = args.max_length or trained.get("max_length", 256)
    cpu_kernels()  # built (or found in the extension cache) now, not after the model has loaded
    model, tokenizer = load_model_and_tokenizer(name, dtype=dtype)
    model.to(get_accelerator().current_device_name())
    print(f"model {name} in {DTYPE_NAMES[dtype]} on {get_accelerator().current_device_name()}")
    if described is not None:
        print(f"held-out set: {described}, {len(examples)} examples")

    def run(label: str) -> dict[str, Any]:
        result = evaluate_examples(
            model, tokenizer, examples, max_length=max_length, max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size, show_progress=True,
        )  # fmt: skip
        if args.prompt:
            result = {"predictions": result["predictions"]}  # no reference answers: no scores
            for prediction in result["predictions"]:
                print(f"{label}: {prediction['prompt']} -> {prediction['prediction']}")
        else:
            print(f"{label}: {format_scores(result)} (n={result['n']})")
        return result

    results: dict[str, Any] = {
        "model": name, "dtype": DTYPE_NAMES[dtype], "dataset": dataset, "facts": facts, "seed": seed,
        "adapter": str(args.adapter or ""), "routing": "host" if args.host_routing else "device",
    }  # fmt: skip
    if not args.no_base:
        results["before"] = run("before (base model)")
    if method == "meft":
        model = meft_ds.MeftModel.from_pretrained(model, args.adapter)  # with PEFT's adapters saved beside (peft/)
        if not args.host_routing:
            meft_ds.for_inference(model)
    elif method is not None:  # the launcher's baselines (--method lora / parallel_adapter)
        model = load_baseline(method, model, args.adapter)
    if method is not None:
        results["method"] = method
        results["after"] = run(f"after  ({args.adapter})")
    if args.output is not None:
        write_json_atomic(args.output, results)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    run_cli(main)
