"""The quality benchmark's grids, declared: which configurations ("cells") of which method run on which task, at
which learning rates and seeds (launch/bench/quality.py runs them and judges the results).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Cell:
    """One configuration: a method at one size, run at every learning rate of ``lrs`` and every seed of ``seeds``."""

    label: str
    method: str
    args: tuple[str, ...]  # train.py arguments of this configuration besides --method
    lrs: tuple[float, ...]
    seeds: tuple[int, ...] = (0,)
    steps: int | None = None  # optimizer steps, when not the grid's (the rehearsal-only controls)


@dataclass(frozen=True)
class Grid:
    facts: int
    steps: int
    micro_batch: int
    eval_limit: int
    cells: tuple[Cell, ...]
    model: str | None = None  # None: the built-in model
    name: str = "full"

    @property
    def task(self) -> str:
        return f"{self.facts} facts, {self.steps} steps"


def meft(
    label: str,
    neurons: int,
    lrs: tuple[float, ...],
    *extra: str,
    seeds: tuple[int, ...] = (0,),
    steps: int | None = None,
) -> Cell:
    return Cell(label, "meft", ("--meft", f"num_neurons={neurons}", *extra), lrs, seeds, steps)


def tfidf(rows: int) -> tuple[str, ...]:
    """train.py arguments of TF-IDF row selection: ``rows`` updated per layer and step (meft.update_rows)."""
    return ("--meft", f"update_rows={rows}")


SEPARATE = ("--meft", "clip_rows=separate")  # the rows clipped by their own norm
PER_ROW = ("--meft", "bias_correction=per_row")
REHEARSE = ("--rehearsal", "80")  # the untrained model's right answers (the launcher's default)
REHEARSE_ALL = (*REHEARSE, "--rehearsal_answers", "all")  # all of them (the launcher's only way until 2026-12-05)
# a control: the rehearsed answers alone, no facts, for about as many samples of them as the mixed run sees (its
# passes over facts + rehearsal: 800 samples over 499 examples on 150 facts, 10 steps of 8; 2,400 over 1,249 on 400, 12)
CONTROL = (*REHEARSE, "--train_limit", "0")
DISTRIBUTION = ("--rehearsal_target", "distribution")  # the untrained model's next-token distributions rehearsed
REHEARSE_DATES = ("--rehearsal", "112")  # every built-in question, with the 32 dates added on 2026-12-06
# its control: 67 right answers, ~1.55 passes as in the mixed run (800 samples over 517 examples): 13 steps of 8
CONTROL_DATES = (*REHEARSE_DATES, "--train_limit", "0")
# a quarter of r=32768's default 1,024 experts, probing a quarter as many: the same 256 keys scored per token, a
# quarter of the routers' device bytes
FEW_EXPERTS = ("--meft", "num_experts=256", "--meft", "n_probe=2")
# the rows' peak rate apart from the routers' (the launcher's --learning_rate): with the routers at 1e-12, routing stays
# where it started and only the rows learn
ROWS_AT_3E3 = ("--meft", "lr=0.003")


def full_grid() -> Grid:
    """What ran on 2026-12-03/04 in about 3 hours of our 2 cores (see ``full_notes`` in sections.md): the issue's task
    size (150 facts, 100 steps of 8); MEFT at r=4096 with its clipping, bias-correction and rehearsal variants, and at
    r=16384; LoRA at r=64, 256, 288 (MEFT r=16384's device bytes) and 512; the parallel adapter just below MEFT r=4096's
    bytes (r=1024) and at r=4096; full fine-tuning, the upper bound; then (2026-12-04) MEFT r=4096 with TF-IDF row
    selection at three sizes and with rehearsal (two seeds); then (2026-12-06) MEFT's default and LoRA r=64 rehearsing
    only the untrained model's right answers (the launcher's default since), and MEFT's default rehearsing all of them;
    then MEFT r=32768 with activation checkpointing, the larger task's headline MEFT (~176 MB of device
    bytes), at two rates and with rehearsal, and MEFT r=4096 with half the rows firing per token (K=32), with and
    without rehearsal, and MEFT's default with rehearsal at two lower rates, and a second seed of LoRA r=64 with
    rehearsal; then the controls of MEFT's default and LoRA r=64 with rehearsal, trained on the rehearsed answers
    alone (no facts: what rehearsing costs the probe by itself); then two more remedies: rehearsing the untrained
    model's distributions instead of its tokens (MEFT's default, two seeds; its control; LoRA r=64) and rehearsing 112
    questions, 32 dates added (the same, MEFT with four seeds), with seeds 2 and 3 of MEFT's rehearsal of 80; then
    (2026-12-07) MEFT's default with its routers frozen. A second cell with the same label and ``seeds=(1,)`` adds a
    seed to a configuration, one with other ``lrs`` extends its sweep."""
    return Grid(
        facts=150, steps=100, micro_batch=8, eval_limit=100,
        cells=(
            meft("MEFT r=4096, rows clipped apart", 4096, (3e-3, 1e-3), *SEPARATE),
            Cell("LoRA r=64", "lora", ("--lora_r", "64"), (3e-3, 1e-3)),
            Cell("LoRA r=64", "lora", ("--lora_r", "64"), (3e-3,), seeds=(1,)),
            meft("MEFT r=4096, global clip (default)", 4096, (3e-3, 1e-2)),
            meft("MEFT r=4096, global clip (default)", 4096, (3e-3,), seeds=(1,)),
            meft("MEFT r=4096, rows not clipped", 4096, (3e-3,), "--meft", "clip_rows=none"),
            meft("MEFT r=4096, rows apart, per-row bias correction", 4096, (3e-3,), *SEPARATE, *PER_ROW),
            meft("MEFT r=4096, rows apart, per-row bias correction", 4096, (3e-3,), *SEPARATE, *PER_ROW, seeds=(1,)),
            meft("MEFT r=4096, rows apart, rehearsal 80, all answers", 4096, (3e-3,), *SEPARATE, *REHEARSE_ALL),
            Cell("LoRA r=64, rehearsal 80, all answers", "lora", ("--lora_r", "64", *REHEARSE_ALL), (3e-3,)),
            Cell("parallel adapter r=1024", "parallel_adapter", ("--adapter_neurons", "1024"), (3e-3,)),
            Cell("LoRA r=256", "lora", ("--lora_r", "256"), (1e-3,)),
            meft("MEFT r=16384, global clip", 16384, (3e-3,)),
            meft("MEFT r=4096, global clip (default)", 4096, (5e-3,)),
            Cell("LoRA r=256", "lora", ("--lora_r", "256"), (3e-3,)),
            meft("MEFT r=16384, global clip", 16384, (3e-3,), seeds=(1,)),
            Cell("LoRA r=512", "lora", ("--lora_r", "512"), (1e-3, 5e-4)),
            Cell("LoRA r=256", "lora", ("--lora_r", "256"), (1e-3,), seeds=(1,)),
            Cell("LoRA r=288", "lora", ("--lora_r", "288"), (5e-4,)),
            meft("MEFT r=16384, global clip", 16384, (1e-3, 5e-3)),
            Cell("LoRA r=288", "lora", ("--lora_r", "288"), (5e-4,), seeds=(1,)),
            Cell("LoRA r=288", "lora", ("--lora_r", "288"), (1e-3,)),
            Cell("LoRA r=512", "lora", ("--lora_r", "512"), (5e-4,), seeds=(1,)),
            Cell("full fine-tuning", "full", (), (1e-4,)),
            Cell("parallel adapter r=4096", "parallel_adapter", ("--adapter_neurons", "4096"), (1e-3,)),
            meft("MEFT r=4096, TF-IDF 512 rows", 4096, (3e-3,), *tfidf(512), seeds=(0, 1)),
            meft("MEFT r=4096, TF-IDF 128 rows", 4096, (3e-3,), *tfidf(128)),
            meft("MEFT r=4096, TF-IDF 512 rows, rehearsal 80, all answers", 4096, (3e-3,), *tfidf(512), *REHEARSE_ALL),
            meft("MEFT r=4096, TF-IDF 1024 rows", 4096, (3e-3,), *tfidf(1024)),
            meft("MEFT r=4096, TF-IDF 512 rows, rehearsal 80, all answers", 4096, (3e-3,), *tfidf(512), *REHEARSE_ALL,
                 seeds=(1,)),
            meft("MEFT r=4096, global clip (default), rehearsal 80", 4096, (3e-3,), *REHEARSE, seeds=(0, 1)),
            Cell("LoRA r=64, rehearsal 80", "lora", ("--lora_r", "64", *REHEARSE), (3e-3,)),
            meft("MEFT r=4096, global clip (default), rehearsal 80, all answers", 4096, (3e-3,), *REHEARSE_ALL),
            meft("MEFT r=32768, checkpointed", 32768, (3e-3, 1e-3), "--activation_checkpointing"),
            meft("MEFT r=32768, checkpointed, rehearsal 80", 32768, (1e-3,), "--activation_checkpointing", *REHEARSE),
            meft("MEFT r=4096, K=32", 4096, (3e-3,), "--meft", "top_k=32"),
            meft("MEFT r=4096, K=32, rehearsal 80", 4096, (3e-3,), "--meft", "top_k=32", *REHEARSE),
            meft("MEFT r=4096, global clip (default), rehearsal 80", 4096, (2e-3, 1e-3), *REHEARSE),
            Cell("LoRA r=64, rehearsal 80", "lora", ("--lora_r", "64", *REHEARSE), (3e-3,), seeds=(1,)),
            meft("MEFT r=4096, rehearsal 80 alone (control)", 4096, (3e-3,), *CONTROL, seeds=(0, 1), steps=10),
            Cell("LoRA r=64, rehearsal 80 alone (control)", "lora", ("--lora_r", "64", *CONTROL), (3e-3,), (0, 1), 10),
            meft("MEFT r=4096, distribution rehearsal 80", 4096, (3e-3,), *REHEARSE, *DISTRIBUTION, seeds=(0, 1)),
            meft("MEFT r=4096, distribution rehearsal 80 alone (control)", 4096, (3e-3,), *CONTROL, *DISTRIBUTION,
                 steps=10),
            Cell("LoRA r=64, distribution rehearsal 80", "lora", ("--lora_r", "64", *REHEARSE, *DISTRIBUTION), (3e-3,)),
            meft("MEFT r=4096, rehearsal 112 (dates)", 4096, (3e-3,), *REHEARSE_DATES, seeds=(0, 1)),
            Cell("LoRA r=64, rehearsal 112 (dates)", "lora", ("--lora_r", "64", *REHEARSE_DATES), (3e-3,)),
            meft("MEFT r=4096, rehearsal 112 (dates) alone (control)", 4096, (3e-3,), *CONTROL_DATES, steps=13),
            meft("MEFT r=4096, rehearsal 112 (dates)", 4096, (3e-3,), *REHEARSE_DATES, seeds=(2, 3)),
            meft("MEFT r=4096, global clip (default), rehearsal 80", 4096, (3e-3,), *REHEARSE, seeds=(2, 3)),
            meft("MEFT r=4096, routers frozen", 4096, (1e-12,), *ROWS_AT_3E3, seeds=(0, 1)),
        ),
    )  # fmt: skip


def capacity_grid() -> Grid:
    """The issue's larger task: 400 facts (1,200 training questions, 2.7x the default's), 300 steps of 8 (two passes
    over them, as 100 steps are over the default's 450); the headline configurations at their best learning rates on
    150 facts: MEFT r=16384 against LoRA r=288 (its device bytes) and r=64 (fewer), then MEFT r=4096, then MEFT r=16384
    at a higher rate (its training loss stayed above LoRA's at 3e-3); then a second seed of the headline pair; then
    MEFT r=16384 with twice the neurons firing per token, with its rows clipped apart and bias corrected per row, and
    at a lower rate; the parallel adapter; a second seed of MEFT r=16384 at 2e-3; LoRA r=288's sweep widened, then
    MEFT's (1e-3); MEFT r=16384 at 1e-3 with rehearsal, and with TF-IDF row selection (2048 rows: the share of 512 at
    r=4096) and rehearsal, for what it retains; second seeds of LoRA r=288 and MEFT r=16384 at their best rates; then
    MEFT at r=32768 (twice the rows at the same K and probed keys per token), LoRA r=400 at its device bytes (607 MB:
    a micro-batch's union of rows grows with r) at two rates, a second seed of each at its best rate, and both with
    rehearsal, for what they retain at equal bytes; then MEFT r=32768 with activation checkpointing (one layer's
    fetched rows on the device: 176 MB), LoRA (r=104) and the parallel adapter (r=512) at those bytes, LoRA's sweep
    widened and a second seed at its best rate; then both rehearsing the untrained model's right answers (three
    seeds); then (2026-12-06) the checkpointed MEFT with a quarter of the experts (a quarter of the routers' bytes)
    at two rates, third seeds of the pair at ~177 MB (and of the same MEFT without checkpointing), and both
    rehearsal runs' controls (the rehearsed answers alone); then LoRA at the 256-expert MEFT's bytes (r=32), and
    a second seed of each at its best rate; then, the device bytes corrected (ZeRO-2's offloaded gradients), LoRA at
    the two checkpointed MEFTs' new bytes: r=117 (110 MB, three seeds) and r=42 (52 MB, two seeds); then the
    checkpointed MEFT r=32768's sweep widened to LoRA r=104's three rates (5e-4, 2e-3); then its rows' rate apart from
    its routers' (rows at 2e-3 with the routers at 1e-3; rows at 1e-3 with the routers at 5e-4, three seeds); then
    LoRA r=117's sweep widened to r=104's rates (2e-3, 5e-4)."""
    return Grid(
        facts=400, steps=300, micro_batch=8, eval_limit=100, name="capacity",
        cells=(
            meft("MEFT r=16384, global clip", 16384, (3e-3,)),
            Cell("LoRA r=288", "lora", ("--lora_r", "288"), (1e-3,)),
            Cell("LoRA r=64", "lora", ("--lora_r", "64"), (3e-3,)),
            meft("MEFT r=4096, global clip (default)", 4096, (3e-3,)),
            meft("MEFT r=16384, global clip", 16384, (5e-3,)),
            meft("MEFT r=16384, global clip", 16384, (3e-3,), seeds=(1,)),
            Cell("LoRA r=288", "lora", ("--lora_r", "288"), (1e-3,), seeds=(1,)),
            meft("MEFT r=16384, K=128", 16384, (3e-3,), "--meft", "top_k=128"),
            meft("MEFT r=16384, rows apart, per-row bias correction", 16384, (3e-3,), *SEPARATE, *PER_ROW),
            meft("MEFT r=16384, global clip", 16384, (2e-3,)),
            Cell("parallel adapter r=1024", "parallel_adapter", ("--adapter_neurons", "1024"), (3e-3,)),
            meft("MEFT r=16384, global clip", 16384, (2e-3,), seeds=(1,)),
            Cell("LoRA r=288", "lora", ("--lora_r", "288"), (2e-3, 5e-4)),
            meft("MEFT r=16384, global clip", 16384, (1e-3,)),
            meft("MEFT r=16384, rehearsal 80, all answers", 16384, (1e-3,), *REHEARSE_ALL),
            meft("MEFT r=16384, TF-IDF 2048 rows, rehearsal 80, all answers", 16384, (1e-3,), *tfidf(2048),
                 *REHEARSE_ALL),
            Cell("LoRA r=288", "lora", ("--lora_r", "288"), (5e-4,), seeds=(1,)),
            meft("MEFT r=16384, global clip", 16384, (1e-3,), seeds=(1,)),
            meft("MEFT r=32768, global clip", 32768, (1e-3,)),
            Cell("LoRA r=400", "lora", ("--lora_r", "400"), (5e-4,)),
            meft("MEFT r=32768, global clip", 32768, (1e-3,), seeds=(1,)),
            Cell("LoRA r=400", "lora", ("--lora_r", "400"), (1e-3,)),
            Cell("LoRA r=400", "lora", ("--lora_r", "400"), (5e-4,), seeds=(1,)),
            Cell("LoRA r=400, rehearsal 80, all answers", "lora", ("--lora_r", "400", *REHEARSE_ALL), (5e-4,)),
            meft("MEFT r=32768, rehearsal 80, all answers", 32768, (1e-3,), *REHEARSE_ALL),
            meft("MEFT r=32768, checkpointed", 32768, (1e-3,), "--activation_checkpointing", seeds=(0, 1)),
            Cell("LoRA r=104", "lora", ("--lora_r", "104"), (1e-3, 2e-3)),
            Cell("parallel adapter r=512", "parallel_adapter", ("--adapter_neurons", "512"), (3e-3,)),
            Cell("LoRA r=104", "lora", ("--lora_r", "104"), (5e-4,)),
            Cell("LoRA r=104", "lora", ("--lora_r", "104"), (1e-3,), seeds=(1,)),
            meft("MEFT r=32768, checkpointed, rehearsal 80", 32768, (1e-3,), "--activation_checkpointing", *REHEARSE),
            Cell("LoRA r=104, rehearsal 80", "lora", ("--lora_r", "104", *REHEARSE), (1e-3,)),
            meft("MEFT r=32768, checkpointed, rehearsal 80", 32768, (1e-3,), "--activation_checkpointing", *REHEARSE,
                 seeds=(1, 2)),
            Cell("LoRA r=104, rehearsal 80", "lora", ("--lora_r", "104", *REHEARSE), (1e-3,), seeds=(1, 2)),
            meft("MEFT r=32768, checkpointed, 256 experts", 32768, (1e-3,), "--activation_checkpointing", *FEW_EXPERTS),
            meft("MEFT r=32768, checkpointed, 256 experts", 32768, (2e-3,), "--activation_checkpointing", *FEW_EXPERTS),
            meft("MEFT r=32768, checkpointed", 32768, (1e-3,), "--activation_checkpointing", seeds=(2,)),
            Cell("LoRA r=104", "lora", ("--lora_r", "104"), (1e-3,), seeds=(2,)),
            meft("MEFT r=32768, global clip", 32768, (1e-3,), seeds=(2,)),  # the checkpointed run's twin, bit for bit
            meft("MEFT r=32768, checkpointed, rehearsal 80 alone (control)", 32768, (1e-3,),
                 "--activation_checkpointing", *CONTROL, seeds=(0, 1), steps=12),
            Cell("LoRA r=104, rehearsal 80 alone (control)", "lora", ("--lora_r", "104", *CONTROL), (1e-3,), (0, 1),
                 12),
            Cell("LoRA r=32", "lora", ("--lora_r", "32"), (1e-3, 2e-3, 3e-3)),  # the 256-expert MEFT's device bytes
            meft("MEFT r=32768, checkpointed, 256 experts", 32768, (1e-3,), "--activation_checkpointing", *FEW_EXPERTS,
                 seeds=(1,)),
            Cell("LoRA r=32", "lora", ("--lora_r", "32"), (2e-3,), seeds=(1,)),
            Cell("LoRA r=117", "lora", ("--lora_r", "117"), (1e-3,), seeds=(0, 1, 2)),  # bytes = MEFT r=32768 ckpt's
            Cell("LoRA r=42", "lora", ("--lora_r", "42"), (2e-3,), seeds=(0, 1)),  # bytes = the 256-expert MEFT's
            meft("MEFT r=32768, checkpointed", 32768, (5e-4, 2e-3), "--activation_checkpointing"),  # LoRA r=104's sweep
            # the rows' rate apart from the routers' (--learning_rate: the routers'; meft.lr: the rows')
            meft("MEFT r=32768, checkpointed, rows at 2e-3", 32768, (1e-3,), "--activation_checkpointing",
                 "--meft", "lr=2e-3"),
            meft("MEFT r=32768, checkpointed, rows at 1e-3", 32768, (5e-4,), "--activation_checkpointing",
                 "--meft", "lr=1e-3", seeds=(0, 1, 2)),
            Cell("LoRA r=117", "lora", ("--lora_r", "117"), (2e-3, 5e-4)),  # its sweep, as r=104's
        ),
    )  # fmt: skip


# the larger task's headline comparison at MEFT's best device budget, each cell at its best learning rate
HEADLINE = {"MEFT r=32768, checkpointed": 1e-3, "LoRA r=117": 1e-3, "parallel adapter r=512": 3e-3, "LoRA r=400": 5e-4}


def headline_grid() -> Grid:
    """The benchmark in about an hour of our 2 cores from scratch (45 min on the Intel Xeon): the larger task's
    best MEFT (r=32768 with activation checkpointing, 110 MB of device bytes) against LoRA of the same bytes (r=117),
    the parallel adapter within them (r=512) and the best LoRA (r=400, 329 MB), one seed each at its best rate.
    Its runs are the capacity grid's (the same task, cells, records folder): run after that grid they are not run
    again; run alone they reproduce its seed-0 rows within run-to-run noise (sums round differently on another CPU)."""
    grid = capacity_grid()
    by_label = {cell.label: cell for cell in grid.cells}  # a label's cells differ only in their rates and seeds
    cells = tuple(dataclasses.replace(by_label[label], lrs=(lr,), seeds=(0,)) for label, lr in HEADLINE.items())
    return dataclasses.replace(grid, cells=cells)


def quick_grid(model: str | None = None) -> Grid:
    """CI-sized: a few steps of each method, one learning rate."""
    return Grid(
        facts=25, steps=3, micro_batch=4, eval_limit=8, model=model, name="quick",
        cells=(
            meft("MEFT r=256", 256, (3e-3,), "--meft", "top_k=8"),
            Cell("LoRA r=4", "lora", ("--lora_r", "4"), (3e-3,)),
            Cell("parallel adapter r=16", "parallel_adapter", ("--adapter_neurons", "16"), (3e-3,)),
        ),
    )  # fmt: skip
