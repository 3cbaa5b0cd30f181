"""The command line of ``launch/train.py``: its options, the checks that refuse a bad one while parsing, before
anything loads (each error names the option and the fix; exit code 2), and the DeepSpeed config, data and settings
they name."""

from __future__ import annotations

import argparse
import copy
import logging
import math
from pathlib import Path
from typing import Any

import meft_ds
from meft_ds import rehearsal
from meft_ds.baselines import METHODS
from meft_ds.checkpoint import UNIVERSAL_POINTER, UNIVERSAL_SUFFIX, checkpoint_step, tag_to_load
from meft_ds.config import merge_settings
from meft_ds.data import (
    DATASETS,
    FORMATS,
    DatasetError,
    check_facts,
    dataset_sources,
    load_examples,
    single_split,
    split_names_apply,
    split_off,
    takes_split_names,
)
from meft_ds.ds_config import (
    WARMUP_FRACTION,
    fit_precision_to_cpu,
    global_batch_size,
    load_deepspeed_config,
    resolve_auto,
    validate_deepspeed_config,
)
from meft_ds.export_load import FUNCTIONAL_SETTINGS, check_base_model, read_adapter_config, read_export
from meft_ds.model_facts import load_model_config
from meft_ds.models import BUILTIN_MODEL, names_builtin_model
from meft_ds.plan import GiB, plan
from meft_ds.training import UsageError, parse_overrides

logger = logging.getLogger("meft_ds.train")

# The built-in demo's settings: tuned so that the 135M model memorises the synthetic facts within ~10 CPU minutes.
# SPEC.md's paper settings (lr 1e-4, effective batch 64, 256 tokens) are for real tasks on a GPU; see README.
DEMO_LR = 3e-3
DEMO_STEPS = 100
# --lr_scheduler: DeepSpeed's schedulers, their steps and rates filled from the command line
SCHEDULERS = {
    "linear": {
        "type": "WarmupDecayLR",
        "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto",
                   "total_num_steps": "auto", "warmup_type": "linear"},
    },
    "cosine": {
        "type": "WarmupCosineLR",
        "params": {"warmup_num_steps": "auto", "total_num_steps": "auto", "warmup_type": "linear"},
    },
    "constant": {
        "type": "WarmupLR",
        "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto",
                   "warmup_type": "linear"},
    },
}  # fmt: skip


def parse_args(argv: list[str] | None = None, description: str | None = None) -> argparse.Namespace:
    """``launch/train.py``'s options (``description``: its ``--help`` text), checked."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model and method")
    model.add_argument(
        "--deepspeed", default="ds_configs/meft.json", help="DeepSpeed JSON config with a 'meft' section"
    )
    model.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    model.add_argument("--method", choices=METHODS, default="meft", help="what to train (see the module doc)")
    model.add_argument(
        "--model", help="hub id, local folder, .gguf file, or the built-in (default: --adapter's base model, else it)"
    )
    model.add_argument(
        "--adapter",
        type=Path,
        help="--method meft: start from this exported adapter (a run's --output_dir, a MeftModel.save_pretrained "
        "folder): its layers, settings, rows and routers; the optimizer's moments start at zero",
    )
    model.add_argument(
        "--meft",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the config's meft section, e.g. --meft num_neurons=8192, or one setting of its store: "
        "--meft store.shard=false (repeatable)",
    )
    model.add_argument(
        "--lora_r",
        type=int,
        help="--method lora: rank (default 16)",
    )
    model.add_argument(
        "--lora_targets",
        help="--method lora: ffn (default: the FFNs MEFT sits beside, their linear layers and MoE experts), "
        "all-linear (every linear layer but the output head), or names, e.g. q_proj,v_proj",
    )
    model.add_argument(
        "--adapter_neurons", type=int, help="--method parallel_adapter: neurons r per FFN (default: meft.num_neurons)"
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset",
        default="facts",
        help=f"one of {', '.join(DATASETS)}, a local .json/.jsonl/.parquet/.csv file, a dataset folder or a hub id; "
        "or several joined by commas, trained on together (name one twice to weight it twice); the first is the task "
        "that is evaluated (its held-out split, --eval_size's part of it)",
    )
    data.add_argument(
        "--dataset_format", choices=FORMATS, help="schema of the rows of every file or hub source (default: inferred)"
    )
    data.add_argument("--dataset_split", help="a hub id's or dataset folder's training split (default: train)")
    data.add_argument("--dataset_config", help="the config of a hub id or dataset folder that has several")
    data.add_argument("--facts", type=int, help="--dataset facts: how many facts (5 per person; default 150)")
    data.add_argument(
        "--max_length", type=int, default=256, help="tokens per example (prompt + answer; a text's window)"
    )
    data.add_argument(
        "--train_limit", type=int, help="use the first N training examples of each source (0: --rehearsal's only)"
    )
    data.add_argument(
        "--eval_dataset",
        help="held-out set: a built-in name (its eval split), a hub id or dataset folder (its --eval_split) or a "
        "local file (default: --dataset's held-out split; a local file as --dataset needs one)",
    )
    data.add_argument(
        "--eval_split",
        help="the held-out split of a hub id or dataset folder (--eval_dataset's, else --dataset's; default: test)",
    )
    data.add_argument(
        "--eval_size",
        type=float,
        help="hold out this fraction (0-1) or count of --dataset's training examples as the held-out set, drawn with "
        "--seed (for a file or dataset without a held-out split); they are not trained on",
    )
    training = parser.add_argument_group("training")
    length = training.add_mutually_exclusive_group()
    length.add_argument("--max_steps", type=int, help=f"optimizer steps (default {DEMO_STEPS})")
    length.add_argument(
        "--num_epochs",
        type=float,
        help="passes over the training examples (a text's windows), instead of --max_steps: the steps are counted "
        "once the examples are tokenized, rounded up to whole steps",
    )
    training.add_argument(
        "--learning_rate", type=float, help=f"fills 'auto' learning rates (default {DEMO_LR:g}: the demo's)"
    )
    training.add_argument(
        "--lr_scheduler",
        choices=SCHEDULERS,
        help="the learning rate after its warmup, in place of the config's scheduler: linear decay (WarmupDecayLR, "
        "the shipped configs'), cosine decay (WarmupCosineLR) or constant (WarmupLR)",
    )
    training.add_argument(
        "--warmup_ratio",
        type=float,
        default=WARMUP_FRACTION,
        help=f"fraction of the steps the learning rate warms up over (fills 'auto' warmup_num_steps; default "
        f"{WARMUP_FRACTION:g})",
    )
    training.add_argument("--micro_batch_size", type=int, default=8, help="fills 'auto' micro batch per rank")
    training.add_argument("--gradient_accumulation_steps", type=int, default=1, help="fills 'auto'")
    training.add_argument("--weight_decay", type=float, default=0.0, help="fills 'auto'")
    training.add_argument("--max_grad_norm", type=float, default=1.0, help="fills 'auto' gradient_clipping")
    training.add_argument(
        "--activation_checkpointing",
        action="store_true",
        help="recompute each layer's forward in its backward (transformers' gradient checkpointing): MEFT then "
        "keeps one layer's fetched rows on the device instead of every layer's, and fetches each row twice",
    )
    training.add_argument(
        "--seed", type=int, default=0, help="the data order, the facts set, --eval_size's draw (meft.seed: the keys')"
    )
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--no_eval", action="store_true", help="skip the before/after evaluation")
    evaluation.add_argument(
        "--no_eval_before",
        action="store_true",
        help="evaluate only after training (retention then counts every probe question as known before, as the "
        "built-in model knows them all)",
    )
    evaluation.add_argument(
        "--eval_limit", type=int, default=200, help="evaluate the first N held-out examples (0: all)"
    )
    evaluation.add_argument("--eval_batch_size", type=int, default=32, help="questions generated at once")
    evaluation.add_argument("--max_new_tokens", type=int, help="generation budget (default: by task)")
    evaluation.add_argument(
        "--eval_steps",
        type=int,
        default=0,
        help="every N optimizer steps (and at the last), the held-out set's loss per answer token, teacher-forced: "
        "eval_loss in the metrics and TensorBoard (0: off; with --no_eval too, which skips the generation)",
    )
    evaluation.add_argument("--no_probe", action="store_true", help="skip the retention probe's general questions")
    rehearsing = parser.add_argument_group("self-rehearsal (keeping what the base model knew)")
    rehearsing.add_argument(
        "--rehearsal",
        type=int,
        default=0,
        help=f"mix N general questions (1..{len(rehearsal.QUESTIONS)}), answered by the untrained model itself, into "
        "the training data, to keep what it knew (meft_ds/rehearsal.py)",
    )
    rehearsing.add_argument(
        "--rehearsal_answers",
        choices=("right", "all"),
        default="right",
        help="--rehearsal: train on the untrained model's answers that hold the question's accepted answer (right), "
        "or on all of them (all: its wrong and rambling answers too, whose phrasings spill onto similar questions)",
    )
    rehearsing.add_argument(
        "--rehearsal_target",
        choices=("tokens", "distribution"),
        default="tokens",
        help="--rehearsal: learn the untrained model's answer tokens (cross-entropy), or its next-token "
        "distribution at each of them (KL divergence, which the untrained model meets: meft_ds/distill.py)",
    )
    output = parser.add_argument_group("output and checkpoints")
    output.add_argument("--output_dir", default="outputs/meft-facts", help="checkpoints, metrics, exported adapter")
    output.add_argument("--no_save", action="store_true", help="no checkpoints, no export (e.g. for a sweep)")
    output.add_argument("--save_steps", type=int, default=200, help="checkpoint every N steps (0: only at the end)")
    output.add_argument(
        "--save_total_limit",
        type=int,
        default=2,
        help="keep only the N latest checkpoints (0: all); each holds the whole row store and its moments",
    )
    output.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output_dir")
    output.add_argument(
        "--resume_universal",
        action="store_true",
        help="continue, on any number of ranks, from the universal checkpoint python -m meft_ds.universal made of it",
    )
    args = parser.parse_args(argv)
    for name in ("max_steps", "micro_batch_size", "gradient_accumulation_steps", "max_length", "eval_batch_size",
                 "lora_r", "adapter_neurons", "max_new_tokens"):  # fmt: skip
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("learning_rate", "weight_decay", "eval_limit", "eval_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    # a method's own option given to another method would be ignored: say so instead of training something else
    # (the config's meft section, and --meft, are read by MEFT and the parallel adapter's default size, and
    # ignored by the others: one set of arguments serves every method of a comparison)
    for name, method in (("lora_r", "lora"), ("lora_targets", "lora"), ("adapter_neurons", "parallel_adapter")):
        if getattr(args, name) is not None and args.method != method:
            parser.error(f"--{name} applies to --method {method}, not {args.method}: drop it")
    args.lora_r = args.lora_r or 16
    args.lora_targets = args.lora_targets or "ffn"
    if args.adapter is not None and args.method != "meft":
        parser.error(f"--adapter starts MEFT from an exported MEFT adapter, not --method {args.method}: drop it")
    if args.model is None:
        export = read_adapter_config(args.adapter) if args.adapter is not None else {}
        args.model = export.get("base_model_name_or_path") or BUILTIN_MODEL
    if args.learning_rate is None:
        args.learning_rate = DEMO_LR
        if not names_builtin_model(args.model):
            logger.warning(
                "--learning_rate: %g is the demo's (the built-in 135M model learning the built-in facts in 100 "
                "steps), not a rate for %s: pass your own (the MEFT paper trained LLaMA-7B at 1e-4).",
                DEMO_LR, args.model,
            )  # fmt: skip
    if not 0 <= args.rehearsal <= len(rehearsal.QUESTIONS):
        parser.error(
            f"--rehearsal {args.rehearsal}: use 0 (off) to {len(rehearsal.QUESTIONS)} (every built-in question)"
        )
    if args.rehearsal_target == "distribution" and not args.rehearsal:
        parser.error("--rehearsal_target distribution needs --rehearsal N (the questions to rehearse)")
    if args.train_limit is not None and args.train_limit < (0 if args.rehearsal else 1):
        parser.error(f"--train_limit {args.train_limit}: use >= 1, or 0 with --rehearsal N (its answers alone)")
    for name in ("save_steps", "save_total_limit"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    try:
        sources = dataset_sources(args.dataset)
        check_facts(args.facts, args.dataset)
    except DatasetError as error:
        parser.error(str(error))
    if args.dataset_format is not None and all(source in DATASETS for source in sources):
        parser.error(f"--dataset_format applies to local files and hub datasets; drop it for the built-in "
                     f"'{args.dataset}'")  # fmt: skip
    for name in ("dataset_split", "dataset_config"):
        if len(sources) > 1 and getattr(args, name) is not None and not any(map(takes_split_names, sources)):
            parser.error(f"--{name} applies to hub ids and dataset folders, and --dataset {args.dataset} names none: "
                         "drop it")  # fmt: skip
    if not 0 <= args.warmup_ratio < 1:
        parser.error(f"--warmup_ratio must be in [0, 1), got {args.warmup_ratio:g}")
    if args.num_epochs is not None:
        if not (math.isfinite(args.num_epochs) and args.num_epochs > 0):
            parser.error(f"--num_epochs must be a number > 0, got {args.num_epochs}")
        if args.rehearsal:  # its examples are the untrained model's answers, known once the steps are set
            parser.error("--num_epochs with --rehearsal: the rehearsed answers are known only once the model has "
                         "answered, after the steps are set. Fix: pass --max_steps instead")  # fmt: skip
    elif args.max_steps is None:
        args.max_steps = DEMO_STEPS
    if args.eval_size is not None:
        size = args.eval_size
        if not (0 < size < 1 or (size >= 1 and size.is_integer())):
            parser.error(f"--eval_size must be a fraction in (0, 1) or a whole count, got {size:g}")
        for name in ("eval_dataset", "eval_split"):
            if getattr(args, name) is not None:
                parser.error(f"--eval_size holds out part of --dataset's training split, --{name} names another "
                             "held-out set: pass one of them")  # fmt: skip
    args.resume = args.resume or args.resume_universal
    if args.resume and args.no_save:
        parser.error("--resume with --no_save: a --no_save run leaves no checkpoint to resume")
    return args


def build_config(args: argparse.Namespace, output_dir: Path) -> dict[str, Any]:
    """The DeepSpeed config with 'auto' values filled from the command line, validated before any long work."""
    ds_config = load_deepspeed_config(args.deepspeed)
    section = ds_config.get("meft", {})
    if not isinstance(section, dict):
        raise meft_ds.MeftConfigError(f"{args.deepspeed}: 'meft' must be a JSON object. Fix: write \"meft\": {{...}}.")
    overrides = parse_overrides(args.meft)
    ds_config["meft"] = section = merge_settings(section, overrides)
    if args.adapter is not None:
        ds_config["meft"] = section = {**section, **adapter_settings(args, overrides)}
    meft = meft_ds.MeftConfig.from_dict(section)
    if args.activation_checkpointing and args.method == "meft":
        meft.check_activation_checkpointing()
    if args.lr_scheduler is not None:
        ds_config["scheduler"] = copy.deepcopy(SCHEDULERS[args.lr_scheduler])
    schedule = copy.deepcopy(ds_config.get("scheduler"))
    fill_auto(ds_config, args, max_steps=args.max_steps or 1)  # --num_epochs: checked with 1 step, counted later
    validate_deepspeed_config(ds_config)
    if args.max_steps is None and schedule is not None:
        ds_config["scheduler"] = schedule  # its 'auto' values filled once the examples are counted (count_steps)
    fit_precision_to_cpu(ds_config)  # decided here, so that the model loads in the dtype the engine computes in
    if isinstance(ds_config.get("tensorboard"), dict):
        ds_config["tensorboard"]["output_path"] = str(output_dir / "tensorboard")
    if args.resume_universal:  # the checkpoint latest_universal names, partitioned anew over this run's ranks
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    return ds_config


def fill_auto(ds_config: dict[str, Any], args: argparse.Namespace, *, max_steps: int) -> None:
    """The config's ``"auto"`` values from the command line (those still ``"auto"``: a second call fills only what
    the first left, :func:`count_steps`'s schedule)."""
    resolve_auto(
        ds_config,
        max_steps=max_steps,
        lr=args.learning_rate,
        micro_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        warmup_fraction=args.warmup_ratio,
    )


def count_steps(args: argparse.Namespace, ds_config: dict[str, Any], num_examples: int, checkpoints: Path) -> None:
    """The run's optimizer steps, logged with the passes over the training examples they make: --max_steps, or
    --num_epochs's, counted here from the examples and the global batch and filled into the config's schedule (a
    run to resume that has reached them is then refused, before the engine starts)."""
    batch = global_batch_size(ds_config)
    if args.num_epochs is not None:
        args.max_steps = epoch_steps(args.num_epochs, num_examples, batch)
        fill_auto(ds_config, args, max_steps=args.max_steps)
        validate_deepspeed_config(ds_config)
        if args.resume:
            check_steps_left(args, Path(args.output_dir), checkpoints)
    if num_examples:
        logger.info(
            "%d optimizer steps of %d examples: %.3g passes over the %d training examples",
            args.max_steps, batch, args.max_steps * batch / num_examples, num_examples,
        )  # fmt: skip


def device_memory_warning(
    args: argparse.Namespace, ds_config: dict[str, Any], accelerator: Any, world_size: int
) -> str | None:
    """What the memory plan (:func:`meft_ds.plan.plan`, as ``launch/plan.py`` prints it) says of this MEFT run on
    ``accelerator``'s device where it does not fit: its need and the changes that would fit, else None (and for
    another method, or on the CPU, whose memory the row store checks as it is built). Said before the model loads (a
    7B model takes minutes to load before running out of memory), as a warning: the plan estimates the rows fetched
    from uniform routing and every example at --max_length."""
    if args.method != "meft" or accelerator.device_name() == "cpu":
        return None
    device_gib = accelerator.total_memory() / GiB
    steps = ds_config.get("gradient_accumulation_steps", 1)
    micro = ds_config.get("train_micro_batch_size_per_gpu") or global_batch_size(ds_config) // (steps * world_size)
    memory_plan = plan(
        args.model, ds_config, batch_size=micro, seq_len=args.max_length, world_size=world_size,
        activation_checkpointing=args.activation_checkpointing,
    )  # fmt: skip
    verdict = memory_plan.verdict(device_gib)
    if verdict.device_fits:
        return None
    changes = "".join(f"\n  - {change}" for change in verdict.changes)
    return (
        f"meft_ds: the memory plan puts this run at {verdict.need / GiB:.2f} GiB of device memory, more than the "
        f"{verdict.budget / GiB:.2f} GiB a {device_gib:.0f} GiB device leaves it: expect it to run out of memory. "
        f"Fix: change one of (python launch/plan.py for the whole plan):{changes}"
    )


def adapter_settings(args: argparse.Namespace, overrides: dict[str, Any]) -> dict[str, Any]:
    """The meft settings that the ``--adapter`` export fixes: the layers it sits on and what it computes (the
    config's section gives the rest: store, learning rate, ...). Refused before the model loads, naming the fix: an
    export that does not load, a ``--meft`` override (``overrides``) that contradicts it, and a ``--model`` of another
    architecture, hidden size or depth."""
    export = read_export(args.adapter)
    fixed = {"layers": sorted(export.names), **{key: getattr(export.settings, key) for key in FUNCTIONAL_SETTINGS}}
    for key, value in fixed.items():
        if key in overrides and overrides[key] != value:
            raise UsageError(
                f"--meft {key}={overrides[key]!r}: the adapter in {args.adapter} has {key}={value!r}. Fix: drop the "
                "override (an adapter's settings come with it), or start without --adapter."
            )
    check_base_model(load_model_config(args.model, weights=True), export)
    return fixed


def check_output_dir(args: argparse.Namespace, output_dir: Path, checkpoints: Path) -> None:
    """A :class:`UsageError` naming the fix where ``--output_dir`` and ``--resume`` disagree: nothing to resume (or no
    universal conversion to resume from), nothing left to train, or a run already there without ``--resume``; a
    :class:`meft_ds.CheckpointError` where ``--resume_universal`` would go back to a universal checkpoint older than
    the run's latest (:func:`meft_ds.checkpoint.tag_to_load`)."""
    resume = "--resume_universal" if args.resume_universal else "--resume"
    tag = tag_to_load(checkpoints, None, universal=args.resume_universal) if args.resume else ""
    if tag is None:
        pointer, fix = "latest", "drop --resume"
        if args.resume_universal:
            pointer = UNIVERSAL_POINTER
            fix = f"convert one: python -m meft_ds.universal {checkpoints} (a ZeRO stage 0 run needs none: --resume)"
        raise UsageError(f"{resume}: no checkpoint in {checkpoints} (no '{pointer}' file). Fix: {fix}.")
    if args.resume and args.max_steps is not None:  # (--num_epochs: checked once the steps are counted)
        check_steps_left(args, output_dir, checkpoints)
    if not args.resume and (checkpoints / "latest").is_file():
        raise UsageError(
            f"--output_dir {output_dir} already holds a run (checkpoints/latest). Fix: add --resume to "
            "continue it, or choose another --output_dir."
        )


def check_steps_left(args: argparse.Namespace, output_dir: Path, checkpoints: Path) -> None:
    """A :class:`UsageError` where the run to resume has reached ``args.max_steps`` already: nothing left to train."""
    resume = "--resume_universal" if args.resume_universal else "--resume"
    tag = tag_to_load(checkpoints, None, universal=args.resume_universal) or ""
    reached = checkpoint_step(tag.removesuffix(UNIVERSAL_SUFFIX))
    if reached is None or reached < args.max_steps:
        return
    option = "--max_steps" if args.num_epochs is None else "--num_epochs"
    steps = f"{args.max_steps} step" + ("s" if args.max_steps > 1 else "")
    length = (
        f"--max_steps is {args.max_steps}"
        if args.num_epochs is None
        else f"--num_epochs {args.num_epochs:g} is {steps}"
    )
    raise UsageError(
        f"{resume}: the run in {output_dir} has reached step {reached}, and {length}: nothing is left to train. "
        f"Fix: raise {option} to train on, or evaluate its export with python launch/evaluate.py --adapter "
        f"{output_dir}."
    )


def epoch_steps(num_epochs: float, num_examples: int, global_batch: int) -> int:
    """Optimizer steps of ``global_batch`` examples that pass over ``num_examples`` ``num_epochs`` times, rounded up
    (the batches run on from one pass into the next, :class:`meft_ds.training.MicroBatchStream`)."""
    return max(1, math.ceil(num_epochs * num_examples / global_batch))


def load_split(args: argparse.Namespace, source: str, split: str, limit: int | None) -> list:
    """Examples of ``source`` (``--facts`` sizes the built-in facts set; a hub id's or dataset folder's split is
    --dataset_split or --eval_split, --dataset's config --dataset_config: in a mixture, of those of its sources that
    have splits); the format of another source's rows is --dataset_format."""
    file_format = None if source in DATASETS else args.dataset_format
    facts = args.facts if source == "facts" else None
    split_name = args.dataset_split if split == "train" else args.eval_split
    # --dataset's config, its held-out split's too
    config_name = args.dataset_config if source in dataset_sources(args.dataset) else None
    if not split_names_apply(source, args.dataset):
        split_name = config_name = None
    return load_examples(
        source, split, format=file_format, limit=limit, seed=args.seed, facts=facts, split_name=split_name,
        config_name=config_name,
    )  # fmt: skip


def load_data(args: argparse.Namespace) -> tuple[list, list | None]:
    """The training examples (of each of --dataset's sources, the first --train_limit) and the held-out set (the
    first --eval_limit; None where nothing evaluates): --eval_size's part of the first source's training split, else
    :func:`load_held_out`."""
    evaluates = bool(args.eval_steps or not args.no_eval)
    task, *mixed = dataset_sources(args.dataset)

    def training_split(source: str) -> list:
        return [] if args.train_limit == 0 else load_split(args, source, "train", args.train_limit)

    if args.eval_size is None:
        train, held_out = training_split(task), None
    else:
        train, held_out = split_off(load_split(args, task, "train", None), args.eval_size, seed=args.seed)
        train, held_out = train[: args.train_limit], held_out[: args.eval_limit or None]
    examples = {task: train}  # each source loaded once: one named twice is trained on twice, the same examples
    for source in mixed:
        if source not in examples:
            examples[source] = training_split(source)
    if mixed:
        logger.info("training examples: %s", ", ".join(f"{len(examples[s])} of {s}" for s in [task, *mixed]))
    train = [example for source in [task, *mixed] for example in examples[source]]
    if not evaluates:
        return train, None
    return train, held_out if held_out is not None else load_held_out(args)


def load_held_out(args: argparse.Namespace) -> list:
    """--eval_dataset (a local file is a split of its own; another source means its held-out split), else the
    held-out split of --dataset's first source (load_examples refuses that for a local file, which has none)."""
    source = args.eval_dataset or dataset_sources(args.dataset)[0]
    if args.eval_dataset and single_split(source):  # (an --eval_split for it is refused)
        return load_examples(
            source, format=args.dataset_format, limit=args.eval_limit or None, split_name=args.eval_split
        )
    return load_split(args, source, "eval", args.eval_limit or None)
