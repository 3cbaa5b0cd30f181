"""Resuming on another number of ranks: the row stores read their rows from whatever files the saving ranks wrote,
ZeRO's partitioned state goes through DeepSpeed's universal checkpoint (python -m meft_ds.universal), and every
wrong turn on the way is refused with its fix."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from launcher_support import LAUNCH_ENV, ROOT, TINY_RUN, launch, launcher_command, metrics, model_dirs, write_config
from safetensors.torch import load_file

from meft_ds.checkpoint import check_world_size, tag_to_load
from meft_ds.store import CheckpointError, CpuRowStore, shard_file_name
from meft_ds.training import changed_batch_warning
from meft_ds.universal import convert_to_universal

__all__ = ["model_dirs"]  # the module-scoped fixture of launcher_support, used here
ROWS, DIM = 12, 4


class _Part(CpuRowStore):
    """Rows ``[start, stop)`` of a layer, saved as a sharded rank saves them (``ShardedRowStore`` without ranks)."""

    is_shard = True

    def __init__(self, keys: torch.Tensor, start: int, stop: int, rank: int, world: int) -> None:
        super().__init__(keys[start:stop], row_start=start, num_rows=keys.shape[0])
        self.rank, self.world = rank, world

    def file_name(self, layer_index: int) -> str:
        return shard_file_name(layer_index, self.rank, self.world)


def trained(store: CpuRowStore) -> CpuRowStore:
    """``store`` with every row, moment and step count set to a value of its own (the global row id in it)."""
    ids = torch.arange(store.row_start, store.row_stop, dtype=torch.float32).view(-1, 1, 1)
    store.rows.copy_(ids + torch.linspace(0, 0.5, 2 * DIM).view(1, 2, DIM))
    store.exp_avg.copy_(ids / 10)
    store.exp_avg_sq.copy_(ids / 100)
    store.row_steps.copy_(torch.arange(store.row_start, store.row_stop, dtype=torch.int32))
    return store


def parts(keys: torch.Tensor, bounds: list[int]) -> list[_Part]:
    world = len(bounds) - 1
    return [_Part(keys, bounds[r], bounds[r + 1], r, world) for r in range(world)]


@pytest.mark.parametrize(
    ("saved_bounds", "loaded_bounds"),
    [([0, 12], [0, 4, 8, 12]), ([0, 6, 12], [0, 12]), ([0, 6, 12], [0, 4, 8, 12]), ([0, 4, 8, 12], [0, 6, 12])],
    ids=["whole to 3 shards", "2 shards to whole", "2 shards to 3", "3 shards to 2"],
)
def test_a_store_loads_its_rows_from_files_saved_by_any_number_of_ranks(
    tmp_path: Path, saved_bounds: list[int], loaded_bounds: list[int]
) -> None:
    keys = torch.randn(ROWS, DIM)
    whole = trained(CpuRowStore(keys))
    saving = [trained(CpuRowStore(keys))] if len(saved_bounds) == 2 else [trained(p) for p in parts(keys, saved_bounds)]
    for store in saving:
        store.save(tmp_path, 0)
    loading = [CpuRowStore(keys)] if len(loaded_bounds) == 2 else parts(keys, loaded_bounds)
    for store in loading:
        store.check_saved(tmp_path, 0)
        store.load(tmp_path, 0)
        rows = slice(store.row_start, store.row_stop)
        for name, tensor in store._held().items():
            assert torch.equal(tensor, whole._held()[name][rows]), name


def test_saved_shards_that_do_not_make_a_layer_are_refused(tmp_path: Path) -> None:
    keys = torch.randn(ROWS, DIM)
    for store in parts(keys, [0, 6, 12]):
        store.save(tmp_path, 0)
    shard_1 = tmp_path / shard_file_name(0, 1, 2)
    shard_1.rename(tmp_path / "aside")
    with pytest.raises(CheckpointError, match=r"the shards \['layer_0\.shard_1_of_2\.safetensors'\] of layer 0's"):
        CpuRowStore(keys).check_saved(tmp_path, 0)
    (tmp_path / "aside").rename(shard_1)
    parts(keys, [0, 4, 8, 12])[0].save(tmp_path, 0)  # another run's shard in the same folder
    with pytest.raises(CheckpointError, match=r"saved by sharded runs of \[2, 3\] ranks"):
        CpuRowStore(keys).check_saved(tmp_path, 0)
    with pytest.raises(CheckpointError, match=r"no row store for layer 1\. Fix: resume with the same meft\.layers"):
        CpuRowStore(keys).check_saved(tmp_path, 1)


def test_the_universal_pointer_is_refused_once_a_later_checkpoint_was_saved(tmp_path: Path) -> None:
    (tmp_path / "latest").write_text("global_step3")
    assert tag_to_load(tmp_path, None, universal=False) == "global_step3"
    assert tag_to_load(tmp_path, None, universal=True) is None  # no universal checkpoint: DeepSpeed says so
    (tmp_path / "latest_universal").write_text("global_step3_universal")
    assert tag_to_load(tmp_path, None, universal=True) == "global_step3_universal"
    (tmp_path / "latest").write_text("global_step9")  # the resumed run saved again, the setting left on
    with pytest.raises(CheckpointError, match=r"later checkpoint, global_step9, was saved since\. Fix: .*remove "):
        tag_to_load(tmp_path, None, universal=True)


def test_a_named_tag_stands_for_its_universal_conversion_under_load_universal(tmp_path: Path) -> None:
    """As Accelerate's load_state names its tag, pytorch_model, itself."""
    saved = tmp_path / "pytorch_model"
    saved.mkdir()
    (saved / "zero_pp_rank_0_mp_rank_00_optim_states.pt").touch()
    assert tag_to_load(tmp_path, "pytorch_model", universal=False) == "pytorch_model"
    with pytest.raises(CheckpointError, match=r"not a universal checkpoint .* Fix: python -m meft_ds\.universal "):
        tag_to_load(tmp_path, "pytorch_model", universal=True)
    (tmp_path / "pytorch_model_universal" / "zero").mkdir(parents=True)
    assert tag_to_load(tmp_path, "pytorch_model", universal=True) == "pytorch_model_universal"
    assert tag_to_load(tmp_path, "pytorch_model_universal", universal=True) == "pytorch_model_universal"


def test_zero_state_of_another_number_of_ranks_is_refused_unless_universal(tmp_path: Path) -> None:
    for rank in range(2):
        (tmp_path / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").touch()
    check_world_size(tmp_path, 2, universal=False)
    check_world_size(tmp_path, 1, universal=True)
    with pytest.raises(CheckpointError, match=r"saved by 2 data-parallel ranks, and this run has 1\. Fix: convert"):
        check_world_size(tmp_path, 1, universal=False)
    check_world_size(tmp_path / "stage0", 4, universal=False)  # no partitioned state: any number of ranks


def test_the_converter_refuses_what_it_cannot_convert(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no such folder\. Fix: "):
        convert_to_universal(tmp_path / "missing")
    with pytest.raises(CheckpointError, match=r"not a DeepSpeed checkpoint \(no mp_rank_00_model_states\.pt\)"):
        convert_to_universal(tmp_path)
    (tmp_path / "mp_rank_00_model_states.pt").touch()
    with pytest.raises(CheckpointError, match=r"no meft/ folder .* ds_to_universal alone"):
        convert_to_universal(tmp_path)
    (tmp_path / "meft").mkdir()
    with pytest.raises(CheckpointError, match=r"nothing to convert: .* resumes at any number of ranks as it is"):
        convert_to_universal(tmp_path)


def test_a_resumed_run_with_another_global_batch_is_told_which_examples_it_skips_or_repeats() -> None:
    assert changed_batch_warning(8, 8, 3) is None and changed_batch_warning(None, 16, 3) is None  # same, or not saved
    assert "with 16 examples a step (micro-batch x accumulation x ranks), where the checkpoint trained with 8: " in (
        changed_batch_warning(8, 16, 3) or ""
    )
    assert "so this run skips examples 24-47 of its stream." in (changed_batch_warning(8, 16, 3) or "")
    assert "so this run sees examples 12-23 of its stream again." in (changed_batch_warning(8, 4, 3) or "")


@pytest.mark.slow
def test_a_two_rank_sharded_run_resumes_on_one_rank_through_a_universal_checkpoint(
    tmp_path: Path, model_dirs: dict[str, Path]
) -> None:
    """Cut at step 3 of 6 on 2 ranks (ZeRO-2, sharded stores), resumed on 1 rank with twice the accumulation: the
    same losses and rows as the 1-rank run straight through."""
    config = write_config(tmp_path, total_steps=6)
    common = ["--deepspeed", config, "--model", model_dirs["chat"], *TINY_RUN, "--no_eval", "--output_dir"]
    one_rank = ["--meft", 'store={"shard": false}', "--gradient_accumulation_steps", "2"]
    launch(*common, tmp_path / "one", "--max_steps", "6", *one_rank)
    launch(*common, tmp_path / "cut", "--max_steps", "3", "--meft", 'store={"shard": true}', ranks=2)

    def resume(how: str, steps: int, *extra: str) -> subprocess.CompletedProcess:
        command = launcher_command(*common, tmp_path / "cut", "--max_steps", steps, *one_rank, how, *extra)
        return subprocess.run(command, cwd=ROOT, env=LAUNCH_ENV, capture_output=True, text=True, timeout=900)

    refused = resume("--resume", 6)  # ZeRO's state of 2 ranks, not converted
    assert refused.returncode == 2
    assert "saved by 2 data-parallel ranks, and this run has 1. Fix: convert it" in refused.stderr
    assert "--resume_universal: no checkpoint in" in resume("--resume_universal", 6).stderr
    assert convert_to_universal(tmp_path / "cut" / "checkpoints") == tmp_path / "cut/checkpoints/global_step3_universal"
    resumed = resume("--resume_universal", 6)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["loss"] for r in metrics(tmp_path / "cut")] == pytest.approx(
        [r["loss"] for r in metrics(tmp_path / "one")], rel=1e-5
    )
    a, b = (saved_rows(tmp_path / name / "checkpoints" / "global_step6" / "meft") for name in ("cut", "one"))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert "examples a step" not in resumed.stderr  # 4 x 1 x 2 ranks, then 4 x 2 x 1 rank: the same global batch
    assert "the data changed" not in resumed.stderr
    again = resume("--resume_universal", 8)  # the same command again, after the resumed run saved step 6
    assert again.returncode == 2 and "a later checkpoint, global_step6, was saved since. Fix: " in again.stderr
    # the checkpoint says what it trained with: the global batch and the count of training examples
    halved = resume("--resume", 7, "--gradient_accumulation_steps", "1", "--train_limit", "30")
    assert halved.returncode == 0, halved.stderr[-3000:]
    assert "with 4 examples a step (micro-batch x accumulation x ranks), where the checkpoint trained with 8" in (
        halved.stderr
    )
    assert "resumed with 30 training examples, where the checkpoint's run had 32: the data changed" in halved.stderr


def saved_rows(directory: Path) -> torch.Tensor:
    """Every layer's saved rows of a replicated store's checkpoint, in one tensor."""
    return torch.cat([load_file(str(path))["rows"].flatten() for path in sorted(directory.glob("layer_*.safetensors"))])
