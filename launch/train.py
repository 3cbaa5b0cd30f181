"""The main job: fine-tune a causal LM with meft_ds sparse adapters under DeepSpeed, evaluate, export.

    deepspeed --num_gpus 1 launch/train.py --deepspeed ds_configs/meft.json
    deepspeed --num_gpus 1 launch/train.py --method lora --lora_r 64    # the same run with LoRA (PEFT) instead

Defaults need no hub and no GPU: the real pretrained SmolLM2-135M-Instruct (built in) learns the built-in
synthetic ``facts`` set, and exact match on held-out paraphrased questions is printed before and after, with the
fraction of the retention probe's general questions (meft_ds/probe.py) still answered right.
``--method`` trains MEFT, LoRA on the FFNs (PEFT), the dense parallel adapter, or every weight, under the same
DeepSpeed config, data, schedule and evaluation; every run reports its device-resident training bytes.
Every input is checked before the long work starts; checkpoints are atomic and ``--resume`` continues a run exactly;
``--adapter DIR`` starts from an exported adapter (a second stage of fine-tuning).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import deepspeed
import torch
from deepspeed import comm as dist
from deepspeed.accelerator import get_accelerator
from train_args import build_config, check_output_dir, count_steps, device_memory_warning, load_data, parse_args

import meft_ds
from meft_ds import NonFiniteGradientError, probe, rehearsal
from meft_ds.baselines import export_baseline, prepare_baseline, training_bytes
from meft_ds.checkpoint import checkpoint_step
from meft_ds.data import tokenize_for_training
from meft_ds.distill import micro_batch_loss, with_teacher
from meft_ds.distributed import check_replicas_identical, unlink_cpu_allreduce_buffer
from meft_ds.ds_config import DTYPE_NAMES, compute_dtype
from meft_ds.evaluation import evaluate_examples, evaluate_loss, format_scores
from meft_ds.files import write_json_atomic
from meft_ds.inject import check_model_type, trainable_numel
from meft_ds.model_facts import load_model_config
from meft_ds.models import load_model_and_tokenizer
from meft_ds.ops import cpu_kernels
from meft_ds.training import (
    MetricsLog,
    MicroBatchStream,
    UsageError,
    changed_batch_warning,
    changed_data_warning,
    free_port,
    progress_bar,
    run_cli,
)

logger = logging.getLogger("meft_ds.train")


def evaluate(
    model: torch.nn.Module, tokenizer: Any, examples: list | None, probe_examples: list | None, args: argparse.Namespace
) -> tuple[dict[str, Any] | None, list[dict[str, Any]] | None]:
    """The held-out scores (plain texts: their loss) and the probe's answers. Every rank generates a share of the
    answers on its device (no rank waits for another's whole evaluation); every rank returns all of them, as one rank
    alone would have."""
    shared = dict(batch_size=args.eval_batch_size, show_progress=dist.get_rank() == 0, across_ranks=True)
    scores = (
        evaluate_examples(
            model, tokenizer, examples, max_length=args.max_length, max_new_tokens=args.max_new_tokens, **shared
        )
        if examples
        else None
    )
    answers = probe.answer_probe(model, tokenizer, probe_examples, **shared) if probe_examples else None
    return scores, answers


def enable_checkpointing(model: torch.nn.Module, name: str) -> None:
    """transformers' activation checkpointing, non-reentrant (the inputs need not require gradients: frozen
    embeddings under LoRA or MEFT), in training mode (which it needs; the evaluation switches to eval mode itself)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UsageError(
            f"--activation_checkpointing: {name} ({type(model).__name__}) does not support activation "
            "checkpointing in transformers. Fix: drop --activation_checkpointing."
        )
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # its name from transformers 5.2x on
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    model.train()


def build_engine(model: torch.nn.Module, ds_config: dict[str, Any], args: argparse.Namespace) -> tuple[Any, Any]:
    """The DeepSpeed engine of ``--method`` and the model it trains (LoRA: the PEFT model around ``model``)."""
    if args.method == "meft":
        engine, *_ = meft_ds.initialize(model=model, config=ds_config)
        return engine, model
    neurons = args.adapter_neurons or meft_ds.MeftConfig.from_dict(ds_config["meft"]).num_neurons
    model = prepare_baseline(
        args.method, model, lora_r=args.lora_r, lora_targets=args.lora_targets, adapter_neurons=neurons
    )
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config)
    unlink_cpu_allreduce_buffer()  # as meft_ds.initialize does: a DeepSpeed leak on CPUs
    return engine, model


def train(
    engine: Any,
    model: torch.nn.Module,
    tokenizer: Any,
    features: list,
    log: MetricsLog,
    args: argparse.Namespace,
    checkpoints: Path,
    held_out: list | None,
) -> None:
    """Optimizer steps from the engine's current one up to --max_steps, with a checkpoint every --save_steps and
    one at the end, and the loss of the ``held_out`` features every --eval_steps."""
    rank, world = dist.get_rank(), dist.get_world_size()
    gas = engine.gradient_accumulation_steps()
    stream = MicroBatchStream(len(features), engine.train_micro_batch_size_per_gpu(), seed=args.seed)
    with progress_bar(args.max_steps, initial=engine.global_steps, enabled=rank == 0) as bar:  # closed if stopped
        while engine.global_steps < args.max_steps:
            step = engine.global_steps
            traffic_before = meft_ds.stats(model)
            step_started = time.time()
            loss_sum = torch.zeros((), dtype=torch.float32, device=engine.device)
            for micro in range(gas):
                indices = stream.indices((step * gas + micro) * world + rank)
                loss = micro_batch_loss(engine, [features[i] for i in indices], tokenizer.pad_token_id, engine.device)
                engine.backward(loss)
                engine.step()
                loss_sum += loss.detach().float()
            dist.all_reduce(loss_sum)  # the step's loss: mean over ranks and micro-batches
            mean_loss = loss_sum.item() / (gas * world)
            record = log.step_record(engine, model, traffic_before, mean_loss, time.time() - step_started)
            record["epoch"] = epochs_done(engine, len(features))
            if held_out and (engine.global_steps % args.eval_steps == 0 or engine.global_steps == args.max_steps):
                record["eval_loss"] = evaluate_loss(
                    model, held_out, tokenizer.pad_token_id, engine.device, batch_size=args.eval_batch_size,
                    across_ranks=True,
                )  # fmt: skip
                if rank == 0:
                    bar.write(f"step {engine.global_steps}: held-out loss {record['eval_loss']:.4f}")
            log.write(record)
            bar.update(1)
            bar.set_postfix(
                loss=f"{record['loss']:.3f}",
                lr=f"{record['lr']:.1e}",
                rows=record["rows_fetched"],
                MB=f"{record['mb_moved']:.1f}",
            )
            periodic = args.save_steps and not args.no_save
            if periodic and engine.global_steps % args.save_steps == 0 and engine.global_steps < args.max_steps:
                save_checkpoint(engine, checkpoints, args.save_total_limit, len(features))
    if not args.no_save:
        save_checkpoint(engine, checkpoints, args.save_total_limit, len(features))


def epochs_done(engine: Any, num_examples: int) -> float:
    """Passes over the training examples the engine's steps have made (the batches run on from one into the next)."""
    return round(engine.global_steps * engine.train_batch_size() / num_examples, 4)


def save_checkpoint(engine: Any, checkpoints: Path, keep: int, num_examples: int) -> None:
    """A checkpoint of the engine (meft_ds saves the row stores with it), then only the ``keep`` latest of the run's
    (0: all): each holds the whole row store and its moments (1.7 GB for the demo, tens of GB for a 7B model), so
    keeping every one fills the disk. Older ones go once every rank has written the new one, deleted by each node's
    local rank 0 (ranks sharing a file system overlook what another already removed). Each checkpoint holds the
    global batch and the count of training examples, which a resumed run compares with its own."""
    engine.save_checkpoint(
        str(checkpoints), client_state={"global_batch": engine.train_batch_size(), "train_examples": num_examples}
    )
    if not keep:
        return
    dist.barrier()
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return
    latest = (checkpoints / "latest").read_text().strip()
    steps = {path: checkpoint_step(path.name) for path in checkpoints.iterdir() if path.is_dir()}
    saved = sorted((step, path) for path, step in steps.items() if step is not None)
    for _, path in saved[:-keep]:
        if path.name != latest:
            shutil.rmtree(path, ignore_errors=True)


def run_training_bytes(
    model: torch.nn.Module,
    ds_config: dict[str, Any],
    features: list,
    args: argparse.Namespace,
    micro_batch: int,
    rows_fetched: float,
) -> Any:
    """:func:`meft_ds.baselines.training_bytes` of this run: its micro-batch at the longest example's length, and for
    MEFT ``rows_fetched`` per adapter and forward, as measured."""
    return training_bytes(
        args.method, model, ds_config, batch_size=micro_batch, seq_len=max(len(f["input_ids"]) for f in features),
        world_size=dist.get_world_size(), rows_fetched_per_layer=rows_fetched or None,
        checkpointing=args.activation_checkpointing,
    )  # fmt: skip


def fit_background(
    model: torch.nn.Module, answered: list, tokenizer: Any, device: torch.device, args: argparse.Namespace
) -> int:
    """``meft.update_rows``: the TF-IDF background, each of ``answered`` (built-in general questions with the base
    model's own answers) among the first ``rehearsal.BACKGROUND`` one document (before a resumed run loads its
    checkpoint: the base model's routing)."""
    background = {question for question, _ in rehearsal.QUESTIONS[: rehearsal.BACKGROUND]}
    documents = [
        {"input_ids": torch.tensor([f["input_ids"]], device=device)}
        for f in tokenize_for_training([e for e in answered if e.prompt in background], tokenizer, args.max_length)
    ]
    count = meft_ds.fit_background(model, documents)
    logger.info("update_rows: background of %d general questions answered by the base model", count)
    return count


def as_one_process_without_a_launcher() -> None:
    """``python launch/train.py``, with no launcher: one process, given the environment a launcher gives the only rank
    (DeepSpeed would look for MPI instead, and stop on a missing mpi4py). Left alone under any launcher, mpirun or a
    multi-task Slurm step."""
    launched = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
    if any(name in os.environ for name in launched) or int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def resume_hint(checkpoints: Path, *, without: str) -> str:
    """Where a stopped run goes on from: its latest checkpoint, or ``without`` one (what to do instead)."""
    latest = checkpoints / "latest"
    if not latest.is_file():
        return f"No checkpoint was saved yet: {without}."
    return f"Last checkpoint: {checkpoints / latest.read_text().strip()}; resume with the same command plus --resume."


class NameOnceFormatter(logging.Formatter):
    """``time name: message``, but the library's own messages say "meft_ds: " themselves (they must, for programs
    that configure no logging) and are not prefixed twice."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        return text.replace(f"{record.name}: meft_ds: ", f"{record.name}: ", 1)


def main(argv: list[str] | None = None) -> int:
    handler = logging.StreamHandler()
    handler.setFormatter(NameOnceFormatter("%(asctime)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    args = parse_args(argv, description=__doc__)
    as_one_process_without_a_launcher()
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    output_dir = Path(args.output_dir)
    checkpoints = output_dir / "checkpoints"
    check_output_dir(args, output_dir, checkpoints)

    # everything that can be wrong with the inputs fails here, before the model loads
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"--output_dir {output_dir}: cannot create it ({error}). Fix: choose a writable "
                         "folder.") from None  # fmt: skip
    ds_config = build_config(args, output_dir)
    if args.method != "full":  # adapters beside or inside the FFNs: their place must be known
        check_model_type(load_model_config(args.model, weights=True).model_type, f"--model {args.model}")
    train_examples, held_out = load_data(args)
    eval_examples = None if args.no_eval else held_out
    probe_examples = None if args.no_eval or args.no_probe else probe.probe_examples()
    if too_large := device_memory_warning(args, ds_config, get_accelerator(), world):
        logger.warning(too_large)
    cpu_kernels()  # built (or found in the extension cache) now: without them the run would stop after loading
    started = time.time()
    torch.manual_seed(args.seed)
    dtype = compute_dtype(ds_config)  # a 7B model in bf16 takes 14 GB of host memory per rank, in fp32 28 GB
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=dtype)
    features = tokenize_for_training(train_examples, tokenizer, args.max_length)
    logger.info(
        "model %s loaded in %s in %.0f s; %d training examples",
        args.model, DTYPE_NAMES[dtype], time.time() - started, len(features),
    )  # fmt: skip
    count_steps(args, ds_config, len(features), checkpoints)

    if args.adapter is not None:  # before the engine: DeepSpeed takes the routers' weights as they are then
        deepspeed.init_distributed()  # (a sharded store partitions its rows across the ranks as it is built)
        meft_ds.load_adapter(meft_ds.inject(model, ds_config["meft"]), args.adapter)
    if args.activation_checkpointing:
        enable_checkpointing(model, args.model)
    engine, model = build_engine(model, ds_config, args)
    # MEFT on the CPU: the steps' large temporaries reuse freed host memory instead of faulting pages in again (not
    # for the baselines: LoRA on every linear layer measured 8% slower with it, meft_ds/host_memory.py)
    on_cpu = get_accelerator().device_name() == "cpu"
    kept_freed_memory = on_cpu and args.method == "meft" and meft_ds.keep_freed_host_memory()
    # built-in general questions answered by the untrained model (before a resumed run loads its checkpoint), once:
    # the first --rehearsal of them join the training data, the first rehearsal.BACKGROUND are meft.update_rows'
    # background
    selects_rows = any(adapter.row_selection is not None for adapter in meft_ds.adapters(model))
    asked = max(args.rehearsal, rehearsal.BACKGROUND) if selects_rows else args.rehearsal
    answered = (
        rehearsal.rehearsal_examples(model, tokenizer, asked, batch_size=args.eval_batch_size, across_ranks=True)
        if asked
        else []
    )
    first = {question for question, _ in rehearsal.QUESTIONS[: args.rehearsal]}
    general = [e for e in answered if e.prompt in first]
    if args.rehearsal_answers == "right":
        general = rehearsal.answered_right(general)
    rehearsed = tokenize_for_training(general, tokenizer, args.max_length)
    if args.rehearsal_target == "distribution":  # from the untrained model, as the answers
        rehearsed = with_teacher(model, rehearsed, engine.device, batch_size=args.eval_batch_size)
    features += rehearsed
    if args.rehearsal:
        logger.info(
            "rehearsal: %d of %d general questions added to training, with the base model's answers (%s) as %s",
            len(general), args.rehearsal, args.rehearsal_answers, args.rehearsal_target,
        )  # fmt: skip
    background = fit_background(model, answered, tokenizer, engine.device, args) if selects_rows else 0
    # on the engine's device, with the adapters in place: every method starts at the base model (MEFT's and the
    # parallel adapter's values and LoRA's B are zero)
    before, probe_before = (
        (None, None) if args.no_eval_before else evaluate(model, tokenizer, eval_examples, probe_examples, args)
    )
    if args.resume:
        _, client_state = engine.load_checkpoint(str(checkpoints))
        logger.info("resumed at step %d", engine.global_steps)
        saved_batch = (client_state or {}).get("global_batch")
        if changed := changed_batch_warning(saved_batch, engine.train_batch_size(), engine.global_steps):
            logger.warning(changed)
        if changed := changed_data_warning((client_state or {}).get("train_examples"), len(features)):
            logger.warning(changed)

    log = MetricsLog(output_dir, enabled=rank == 0, start_step=engine.global_steps, monitor=engine.monitor)
    first_step, fetched_before = engine.global_steps, meft_ds.stats(model)["rows_fetched"]
    try:
        held_out_features = tokenize_for_training(held_out, tokenizer, args.max_length) if args.eval_steps else None
        train(engine, model, tokenizer, features, log, args, checkpoints, held_out_features)
    except NonFiniteGradientError as error:
        raise SystemExit(
            f"error: {error}\n{resume_hint(checkpoints, without='start again with a lower --learning_rate')}"
        ) from error
    except KeyboardInterrupt:  # Ctrl-C (every rank of the terminal's process group gets it): one line, no traceback
        hint = resume_hint(checkpoints, without="run the same command again")
        print(f"\ninterrupted at step {engine.global_steps}. {hint}", file=sys.stderr)
        raise SystemExit(130) from None
    # rows fetched per adapter and forward: a checkpointed micro-step runs each layer's forward twice
    forwards = (engine.global_steps - first_step) * engine.gradient_accumulation_steps()
    forwards *= len(meft_ds.adapters(model)) * (2 if args.activation_checkpointing else 1)
    fetched = (meft_ds.stats(model)["rows_fetched"] - fetched_before) / max(1, forwards)
    device = run_training_bytes(model, ds_config, features, args, engine.train_micro_batch_size_per_gpu(), fetched)
    if args.method == "meft":
        digest = check_replicas_identical(meft_ds.adapters(model), group=engine.data_parallel_group)
        store_bytes = sum(adapter.store.nbytes for adapter in meft_ds.adapters(model))
        checked = "" if digest is None else f", digest {digest.hex()[:16]} (the same on all {world} ranks)"
        logger.info("rank %d: row store holds %d bytes%s", rank, store_bytes, checked)
    if args.no_save:
        pass
    elif args.method == "meft":  # every rank: sharded rows are gathered; rank 0 writes the PEFT-style adapter files
        meft_ds.save_adapter(model, output_dir, base_model_name_or_path=args.model)
    elif rank == 0:
        export_baseline(args.method, model, tokenizer, output_dir)
    after, probe_after = evaluate(model, tokenizer, eval_examples, probe_examples, args)
    retention = probe.retained(probe_before, probe_after) if probe_examples else None
    if rank == 0:
        summary = {
            "model": args.model,
            "method": args.method,
            "lora": {"r": args.lora_r, "targets": args.lora_targets} if args.method == "lora" else None,
            "adapter": args.adapter and str(args.adapter),  # the export it started from
            "dtype": DTYPE_NAMES[dtype],
            "kept_freed_host_memory": kept_freed_memory,
            "dataset": args.dataset,
            "facts": args.facts,
            "seed": args.seed,
            "dataset_config": args.dataset_config,
            "dataset_split": args.dataset_split,
            "eval_dataset": args.eval_dataset,
            "eval_split": args.eval_split,
            "eval_size": args.eval_size,
            "max_length": args.max_length,
            "train_examples": len(features),
            "steps": engine.global_steps,
            "num_epochs": args.num_epochs,
            "lr_scheduler": (ds_config.get("scheduler") or {}).get("type"),
            "warmup_ratio": args.warmup_ratio,
            "epochs": epochs_done(engine, len(features)),
            "first_loss": log.first_loss,
            "last_loss": log.last_loss,
            "before": before,
            "after": after,
            "retention": retention and {**retention, "answers": probe_after},
            "rehearsal": [{"question": e.prompt, "answer": e.answers[0]} for e in general],
            "rehearsal_answers": args.rehearsal_answers if args.rehearsal else None,
            "rehearsal_target": args.rehearsal_target if args.rehearsal else None,
            "background_documents": background,
            "activation_checkpointing": args.activation_checkpointing,
            "trainable_params": trainable_numel(model),
            "device_training": device.as_dict(),
            "seconds": round(time.time() - started, 1),
            "meft": ds_config["meft"] if args.method == "meft" else None,
            "stats": meft_ds.stats(model),
        }
        write_json_atomic(output_dir / "results.json", json.loads(json.dumps(summary, default=str)))
        steps, epochs = engine.global_steps, summary["epochs"]
        print(f"\nloss: {log.first_loss:.4f} -> {log.last_loss:.4f} over {steps} steps ({epochs:g} epochs)")
        print(f"held-out before: {format_scores(before)}")
        print(f"held-out after:  {format_scores(after)}")
        if retention:
            print(f"retention probe: {retention['still_right']} of {retention['known']} known answers still right")
        print(f"device-resident training bytes ({args.method}): {device.device / 1e6:.1f} MB")
        if args.method == "meft" and not args.no_save:
            print(f"adapter exported to {output_dir} (meft_ds.load_adapter(model, '{output_dir}'))")
    dist.barrier()
    return 0


if __name__ == "__main__":
    run_cli(main)
