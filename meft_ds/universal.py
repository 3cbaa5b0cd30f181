"""Resume on another number of ranks: a checkpoint converted to DeepSpeed's universal format, with its row stores.

    python -m meft_ds.universal outputs/run/checkpoints                  # the latest checkpoint
    python -m meft_ds.universal outputs/run/checkpoints/global_step300   # a given one

ZeRO partitions the optimizer state over the data-parallel ranks that saved it, and DeepSpeed loads it only at that
number of ranks, unless it is converted to a universal checkpoint (``deepspeed.checkpoint.ds_to_universal``) and
loaded with ``"checkpoint": {"load_universal": true}``. That converter knows nothing of the ``meft/`` folder beside
DeepSpeed's files; this command runs it and copies the folder in, so that the converted checkpoint (``<tag>_universal``,
named by ``latest_universal``) resumes at any number of ranks. The row stores need no conversion: each rank reads its
rows from the saved files, whichever number of ranks wrote them (:meth:`meft_ds.store.CpuRowStore.load`). The new
folder appears complete or not at all.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from meft_ds.checkpoint import (
    STORE_DIR,
    UNIVERSAL_POINTER,
    UNIVERSAL_SUFFIX,
    check_has_stores,
    holds_partitioned_state,
    tag_to_load,
)
from meft_ds.files import atomic_file, publish_directory, recover_directory
from meft_ds.store import CheckpointError
from meft_ds.training import run_cli


def convert_to_universal(checkpoint: Path) -> Path:
    """Convert ``checkpoint`` (a tag folder, or a folder of checkpoints whose ``latest`` names one) and point
    ``latest_universal`` at the result, ``<tag>_universal`` beside it; returns its path."""
    if not checkpoint.is_dir():
        raise CheckpointError(f"{checkpoint}: no such folder. Fix: name a folder of checkpoints, or one of them.")
    latest = tag_to_load(checkpoint, None, universal=False)
    if latest is not None:  # a folder of checkpoints
        checkpoint = checkpoint / latest
    recover_directory(checkpoint)
    if not (checkpoint / "mp_rank_00_model_states.pt").is_file():
        raise CheckpointError(
            f"{checkpoint}: not a DeepSpeed checkpoint (no mp_rank_00_model_states.pt). Fix: name a folder of "
            "checkpoints holding 'latest', or one of its global_step* folders."
        )
    check_has_stores(checkpoint)
    if not holds_partitioned_state(checkpoint):
        raise CheckpointError(
            f"{checkpoint}: nothing to convert: its optimizer state is not partitioned over the ranks (no "
            "*zero_pp_rank_* files, as ZeRO stage 0 saves it), so it resumes at any number of ranks as it is "
            "(launch/train.py: --resume)."
        )
    root, name = checkpoint.parent, f"{checkpoint.name}{UNIVERSAL_SUFFIX}"
    staging = root / f".staging-{name}"  # DeepSpeed's converter writes its own latest_universal beside its output
    shutil.rmtree(staging, ignore_errors=True)
    output = staging / name
    command = [
        sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(checkpoint),
        "--output_folder", str(output), "--inject_missing_state",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointError(f"DeepSpeed's ds_to_universal failed on {checkpoint}:\n{result.stderr[-3000:]}")
    shutil.copytree(checkpoint / STORE_DIR, output / STORE_DIR)
    publish_directory(output, root / name)
    shutil.rmtree(staging)
    with atomic_file(root / UNIVERSAL_POINTER) as temporary:
        temporary.write_text(name)
    return root / name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a folder of checkpoints (its latest) or a global_step* folder")
    converted = convert_to_universal(parser.parse_args(argv).checkpoint)
    print(
        f'wrote {converted}. Resume with any number of ranks and "checkpoint": {{"load_universal": true}} in the '
        "DeepSpeed config (it loads the checkpoint latest_universal names); once that run has saved a checkpoint of "
        "its own, remove the setting again."
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
