"""Smoke test of the benchmark's plumbing (launch/bench.py, launch/bench/) at tiny sizes.

Every assertion is on a computed quantity (byte formulas against hand counts, measured bytes against the library's
counters, tables against their data); none is on a timing.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))

from bench import adam, formulas, inference, memory, report, routing_cost, scaleout, steptime, timeline, traffic
from bench.common import (
    Context,
    Section,
    Settings,
    build_meft,
    fits_in_memory,
    fmt_bytes,
    packed_batches,
    step_function,
)
from bench.scaleout_nvme import RAW_MIN
from launch_scripts import launch_script
from tiny_models import tiny_model, token_batch, word_tokenizer

import meft_ds
from meft_ds.config import MeftConfigError

TINY = dataclasses.replace(
    Settings.quick(),
    micro_batch=2,
    seq_len=16,
    top_k=4,
    accum_steps=3,
    traffic_neurons=(64,),
    traffic_plain_micro_steps=2,
    train_steps=1,
    step_neurons=64,
    step_repeats=1,
    lora_rank=2,
    memory_neurons=(16, 64, 256),
    memory_layer=1,
    routing_neurons=256,
    routing_tokens=8,
    routing_dim=16,
    routing_probe=2,
    routing_experts=(2, 3, 4, 16, 64, 128, 256),
    routing_repeats=1,
    scaleout_launch_per_variant=False,
)


@pytest.fixture
def context() -> Context:
    tokenizer = word_tokenizer(chat=True)
    batches = packed_batches(tokenizer, TINY.micro_batch, TINY.seq_len)
    return Context(
        TINY, "python launch/bench.py --test", model=tiny_model(), tokenizer=tokenizer, micro_batches=batches
    )


# ----------------------------------------------------------------------------------------------------------------
# a. traffic


def test_dense_offload_bytes_match_a_hand_count() -> None:
    # N = 1000 bf16 elements, G = 4 micro-steps (DeepSpeed 0.19.8 ZeRO-2 CPU offload as coded):
    # micro-step 0: grads out (2000); micro-steps 1-3: accumulated grads in (2000) and out (2000) each;
    # boundary: fp32 grads out (4000); step: bf16 params in (2000).
    coded = formulas.zero_offload_bytes(1000, 4)
    assert coded.to_host == 2000 + 3 * 2000 + 4000
    assert coded.to_device == 3 * 2000 + 2000
    assert coded.total == 20000
    single = formulas.zero_offload_bytes(1000, 1)  # no accumulation: the fp32 copy out, the params in
    assert (single.to_device, single.to_host) == (2000, 4000)
    minimal = formulas.minimal_offload_bytes(1000, 4)
    assert (minimal.to_device, minimal.to_host) == (2000, 4 * 2000)
    assert formulas.dense_adapter_params(30, 4096, 576) == 30 * 2 * 4096 * 576
    with pytest.raises(ValueError):
        formulas.zero_offload_bytes(1000, 0)


def test_packed_batches_are_full_blocks_of_real_text() -> None:
    tokenizer = word_tokenizer(chat=True)
    batches = packed_batches(tokenizer, 2, 16)
    assert len(batches) > 10
    for batch in batches:
        assert batch["input_ids"].shape == batch["labels"].shape == (2, 16)
    labels = torch.cat([b["labels"].flatten() for b in batches])
    inputs = torch.cat([b["input_ids"].flatten() for b in batches])
    learned = labels != -100
    assert learned.any() and (~learned).any()  # answers learned, prompts not
    assert torch.equal(labels[learned], inputs[learned])


def _tiny_meft(cache_mb: float) -> tuple[torch.nn.Module, list]:
    config = meft_ds.MeftConfig(num_neurons=64, top_k=4, row_dtype="bf16", cache_mb=cache_mb)
    return build_meft(tiny_model(), config, lr=1e-3)


def test_measured_meft_bytes_are_the_stats_counters() -> None:
    model, optimizers = _tiny_meft(cache_mb=0)
    batches = [{"input_ids": token_batch(2, 16, seed=i), "labels": token_batch(2, 16, seed=i)} for i in range(3)]
    window = traffic.measure_window(model, optimizers, batches)
    counters = meft_ds.stats(model)  # the model's counters started at zero
    assert window.total() == counters
    dim, layers = 64, 2
    for delta in window.micro:
        assert delta["forward_calls"] == layers
        assert delta["row_bytes_to_device"] == delta["rows_fetched"] * 2 * dim * 2  # key + value rows, bf16
        assert 0 < delta["row_bytes_to_host"] <= delta["row_bytes_to_device"]  # only rows with a gradient return
    assert window.step["rows_updated"] == counters["rows_updated"] > 0
    exact = window.plain_bytes_at(3)
    assert (exact.to_device, exact.to_host) == (counters["bytes_to_device"], counters["bytes_to_host"])
    doubled = window.plain_bytes_at(6)
    assert doubled.to_device == 2 * counters["bytes_to_device"]


def test_cached_window_is_the_whole_optimizer_step() -> None:
    model, optimizers = _tiny_meft(cache_mb=1)
    batches = [{"input_ids": token_batch(2, 16, seed=i), "labels": token_batch(2, 16, seed=i)} for i in range(3)]
    window = traffic.measure_window(model, optimizers, batches)
    counters = meft_ds.stats(model)
    assert window.total() == counters
    assert counters["cache_hits"] > 0
    assert window.step["row_bytes_to_host"] > 0  # the cache's gradients come back at the optimizer step
    exact = window.cache_bytes(3)
    assert (exact.to_device, exact.to_host) == (counters["bytes_to_device"], counters["bytes_to_host"])
    with pytest.raises(ValueError, match="3 micro-steps"):  # a row travels once per step: no scaling
        window.cache_bytes(5)


def test_traffic_experiment_reports_what_it_measured(context: Context) -> None:
    section = traffic.run(context)
    (result,) = section.data["results"]
    assert result["dense_params"] == 2 * 64 * 64 * 2
    g = TINY.accum_steps
    for state in ("init", "trained"):
        plain = traffic.Window(**result["windows"][state]["plain"])
        router = formulas.zero_offload_bytes(result["router_params"], g)
        assert traffic.variant_bytes(result, state, "plain", g).to_device == pytest.approx(
            g * plain.micro_mean("bytes_to_device") + plain.step["bytes_to_device"] + router.to_device
        )
        cached = traffic.Window(**result["windows"][state]["cache"])
        assert len(cached.micro) == g  # the whole optimizer step, measured
        at_g = traffic.variant_bytes(result, state, "cache", g)
        assert at_g.to_host == cached.total()["bytes_to_host"] + router.to_host
        assert traffic.variant_bytes(result, state, "dense_coded", g) == formulas.zero_offload_bytes(2 * 64 * 64 * 2, g)
    # the table's ratio column is dense (as coded) / variant, from the same numbers
    rows = {(r[1], r[2].split(" (")[0]): r for r in section.rows}
    coded = formulas.zero_offload_bytes(result["dense_params"], g).total
    ratio = coded / traffic.variant_bytes(result, "init", "plain", g).total
    assert rows[("init", "MEFT, no cache")][6] in (f"{ratio:.2f}x", f"{ratio:.1f}x")
    assert len(section.rows) == 2 * 4  # two states x (two dense baselines + two MEFT variants)


def test_what_does_not_fit_in_memory_is_skipped_with_a_note() -> None:
    notes: list[str] = []
    assert fits_in_memory(1, "tiny", notes) and notes == []
    assert not fits_in_memory(1 << 70, "huge", notes)
    assert len(notes) == 1 and notes[0].startswith("huge skipped")


def test_meft_settings_layer_the_overrides_between_the_experiment_and_its_variant(context: Context) -> None:
    context.overrides = {"n_probe": 2, "top_k": 8}
    config = context.meft({"num_neurons": 64, "top_k": 4, "n_probe": 4}, {"cache_mb": 1})
    assert (config.top_k, config.n_probe, config.cache_mb) == (8, 2, 1)  # --meft beats the experiment, the variant both
    with pytest.raises(MeftConfigError):  # a wrong or unknown setting is an error, never skipped
        context.meft({"num_neurons": 64, "top_k": 4}, {"cache_mb_v2": 1})


# ----------------------------------------------------------------------------------------------------------------
# b, c, d, e


def test_sparse_adam_traffic_counts_touched_rows_only() -> None:
    assert adam.adam_traffic_bytes(10, 8) == 7 * 10 * 8 * 4
    ids = adam.touched_rows(100, 0.25)
    assert ids.numel() == 25 and torch.equal(ids, ids.sort().values) and ids.unique().numel() == 25
    adapter = adam.row_adapter(64, 2 * 8)
    assert adapter.store.rows.shape == (64, 2, 8)
    before = adapter.store.rows.clone()
    adam.sparse_step_seconds(adapter, "torch", 0.25, repeats=2)  # 1 warm-up + 2 timed steps
    assert adapter.traffic.rows_updated == 3 * 16
    changed = (adapter.store.rows != before).flatten(1).any(dim=1)
    assert torch.equal(changed.nonzero().flatten(), adam.touched_rows(64, 0.25))


def test_step_time_runs_every_variant(context: Context) -> None:
    section = steptime.run(context)
    labels = [row[0] for row in section.rows]
    assert labels == [m["variant"] for m in section.data["measured"]]
    assert any(label.startswith("MEFT") for label in labels) and sum("LoRA" in label for label in labels) == 2
    dense = next(m for m in section.data["measured"] if m["variant"] == "dense adapter r=64")
    assert dense["trainable"] == 2 * (2 * 64 * 64)


def test_device_bytes_add_up(context: Context) -> None:
    section = memory.run(context)
    for m in section.data["measured"]:
        assert m["row_bytes"] == m["rows"] * 2 * 64 * 2  # bf16 key + value rows of d=64
        assert m["meft"] == m["router"] + m["fetched"] + m["cache"]
        assert m["router"] == m["experts"] * 64 * 4
        assert m["dense_offloaded"] == 2 * 2 * m["neurons"] * 64
        assert m["fetched"] <= section.data["bound"]
    assert section.data["bound"] == memory.fetch_bound(2 * 16, 4, 64)


def test_routing_cost_grid_and_analytic_cost(context: Context) -> None:
    assert routing_cost.analytic_macs(tokens=2, experts=4, n_probe=2, neurons=16, dim=3) == 2 * (4 + 2 * 4) * 3
    assert routing_cost.expert_grid(16384, 64, 8, (16, 2048, 4096, 3000)) == [16, 2048]
    section = routing_cost.run(context)
    experts = [m["experts"] for m in section.data["measured"]]
    assert experts == [2, 4, 16, 64, 128]  # 3 does not divide r; with 256 the probed pool (2 x 1) < K = 4
    for m in section.data["measured"]:
        assert m["macs"] == routing_cost.analytic_macs(8, m["experts"], 2, 256, 16)


def test_generation_speed_compares_both_paths_on_the_same_outputs(context: Context, tmp_path: Path) -> None:
    section = inference.run(context)
    data, measured = section.data, section.data["measured"]
    assert data["identical"] and data["tokens"] == data["prompts"] * inference.NEW_TOKENS
    assert data["changed_vs_base"] > 0, "the adapters' random values change what the model answers"
    assert measured["device"]["to_device_per_token"] == measured["device"]["to_host_per_token"] == 0
    assert measured["host"]["to_device_per_token"] > 0 and measured["host"]["to_host_per_token"] > 0
    assert data["device_bytes"] == 2 * 2 * 4096 * 64 * 4  # two layers of fp32 keys and values, r = 4096, d = 64
    for path, row in zip(inference.PATHS, section.rows, strict=True):
        assert len(measured[path]["times"]) == len(measured[path]["cpu_share"]) == 3 * TINY.step_repeats - 2
        assert row[2] == f"{measured[path]['tokens_per_s']:.1f}"
    (host,), (device,) = measured["host"]["times"], measured["device"]["times"]  # one timed pair at TINY's sizes
    assert data["paired_speedup"] == data["speedup"] == host / device and section.met == (host > device)
    inference.plot(section, str(tmp_path / "g.png"))
    assert (tmp_path / "g.png").stat().st_size > 0


# ----------------------------------------------------------------------------------------------------------------
# report and CLI


def test_markdown_names_the_command_the_table_and_the_plot(tmp_path: Path) -> None:
    section = Section(
        key="z", title="A test", what="w", how="h", columns=["x", "y"], rows=[[1, "a|b"]], target="t", met=False,
        verdict="v", notes=["n"], command="python launch/bench.py --only z", mode="quick", measured_at="now",
        plot="z.png",
    )  # fmt: skip
    text = report.render_markdown({"z": section}, {"machine": {"cpu": "cpu"}}, {"z": "docs/bench/z.png"})
    assert "`python launch/bench.py --only z`" in text
    assert "| x | y |" in text and "| 1 | a\\|b |" in text
    assert "![A test](docs/bench/z.png)" in text
    assert "**NOT met.**" in text
    report.write_results(tmp_path / "results.json", {"z": section}, {"seconds": 1})
    stored = report.load_results(tmp_path / "results.json")
    assert Section.from_json(stored["sections"]["z"]) == section


def test_sections_measured_on_other_machines_name_theirs() -> None:
    def section(key: str) -> Section:
        return Section(key=key, title=key, what="w", how="h", columns=["x"], rows=[[1]], target="t", met=True,
                       verdict="v", command="c", mode="full")  # fmt: skip

    sections = {"a": section("a"), "g": section("g")}
    same = report.render_markdown(sections, {"machine": {"cpu": "EPYC"}}, {})
    assert "Machine: EPYC, " in same and ", on EPYC)" in same, "every section names its CPU"
    meta = {"machine": {"cpu": "Xeon"}, "machines": {"a": {"cpu": "EPYC"}, "g": {"cpu": "Xeon"}}}
    mixed = report.render_markdown(sections, meta, {})
    assert "Machines: EPYC, " in mixed and "(a); Xeon, " in mixed
    assert ", on EPYC)" in mixed.split("## a.")[1].split("## g.")[0] and ", on Xeon)" in mixed.split("## g.")[1]
    # two CPUs py-cpuinfo names alike are told apart by AVX-512 wherever the record says
    meta = {"machine": {"cpu": "EPYC", "avx512": True}, "machines": {"a": {"cpu": "EPYC", "avx512": False}}}
    apart = report.render_markdown(sections, meta, {})
    assert "EPYC (no AVX-512), " in apart and ", on EPYC (no AVX-512))" in apart.split("## g.")[0]
    assert ", on EPYC (AVX-512))" in apart.split("## g.")[1]


def test_cli_checks_its_arguments(tmp_path: Path) -> None:
    cli = launch_script("bench")
    args = cli.parse_args(["--quick", "--only", "a, e", "--meft", "n_probe=4"])
    assert args.quick and args.only == ["a", "e"] and args.meft == ["n_probe=4"]
    with pytest.raises(SystemExit):
        cli.parse_args(["--only", "a,z"])
    assert cli.parse_args(["--micro-steps", "8"]).micro_steps == 8
    # the project's page is rendered only from the project's results: a run written elsewhere renders beside them
    assert cli.parse_args([]).markdown == cli.ROOT / "BENCHMARKS.md"
    assert cli.parse_args(["--out", str(cli.DOCS)]).markdown == cli.ROOT / "BENCHMARKS.md"
    assert cli.parse_args(["--out", str(tmp_path / "x")]).markdown == tmp_path / "x" / "BENCHMARKS.md"
    assert cli.parse_args(["--out", str(tmp_path / "x"), "--markdown", str(tmp_path / "B.md")]).markdown == (
        tmp_path / "B.md"
    )
    for wrong in (["--micro-steps", "0"], ["--cache-mb", "-5"], ["--markdown", str(tmp_path / "no" / "B.md")]):
        with pytest.raises(SystemExit):
            cli.parse_args(wrong)
    # a mistyped --meft key fails before any experiment runs, even one that reads no meft setting (b)
    out = tmp_path / "out"
    with pytest.raises(meft_ds.MeftConfigError, match=r"meft\.num_neuronz: unknown setting.*'num_neurons'"):
        cli.main(
            [
                "--quick",
                "--only",
                "b",
                "--meft",
                "num_neuronz=4",
                "--out",
                str(out),
                "--markdown",
                str(tmp_path / "B.md"),
            ]
        )
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------------
# f. scale out


def test_scale_out_byte_formulas_match_a_hand_count() -> None:
    # a dense adapter of r=16384 on d=576: keys and values, fp32 gradients, 4 layers; bf16 halves it
    assert formulas.dense_allreduce_bytes(16384, 576, 4) == 4 * 2 * 16384 * 576 * 4
    assert formulas.dense_allreduce_bytes(16384, 576, 4, element_bytes=2) == 4 * 2 * 16384 * 576 * 2
    # replicated: 10 own ids (int64) + the union's 15 rows of gradients (2 x d=8 fp32), spread over 2 layers
    assert formulas.replicated_exchange_bytes(10, 15, 8, 2) == 10 * 8 + 15 * 2 * 8 * 4
    assert formulas.replicated_exchange_bytes(1, 1, 8, 3) == 3 * ((8 + 64) // 3)  # each layer's share rounds down
    # sharded: every touched row's id and gradient goes to its owner
    assert formulas.sharded_exchange_bytes(10, 8, 2) == 10 * (8 + 2 * 8 * 4)
    assert scaleout.adapter_layers(30) == [26, 27, 28, 29] and scaleout.adapter_layers(2) == [0, 1]


@pytest.mark.slow
def test_scale_out_reports_the_counters_of_two_ranks_and_the_nvme_io(context: Context) -> None:
    section = scaleout.run(context)
    dim, layers, neurons = 64, 2, 64  # the tiny model: d=64, adapters on both of its layers, r = step_neurons
    between = section.data["between_ranks"]
    assert [v["variant"] for v in between["variants"]] == ["replicated", "sharded", "sharded, bf16 rows"]
    for v in between["variants"]:
        assert v["dense"] == formulas.dense_allreduce_bytes(neurons, dim, layers) == 2 * 2 * 64 * 64 * 4
        assert v["total"] == v["exchange"] + v["forward"] + v["routers"]
        assert v["routers"] == layers * v["experts"] * dim * 4  # the routers' fp32 gradients
    for rank in between["ranks"]:
        for v in rank["variants"]:  # every counted byte is in some step's deltas
            counted = sum(s["micro"]["bytes_between_ranks"] + s["step"]["bytes_between_ranks"] for s in v["steps"])
            assert counted == v["final"]["bytes_between_ranks"]
        replicated, sharded, _ = rank["variants"]
        assert sharded["rows_held"] * 2 == replicated["rows_held"] == layers * neurons
        for step in replicated["steps"]:
            assert step["micro"]["bytes_between_ranks"] == 0  # replicated stores exchange only at the step
            union = step["step"]["rows_updated"]  # every rank updates the ranks' union
            assert step["step"]["bytes_between_ranks"] == formulas.replicated_exchange_bytes(
                step["touched"], union, dim, layers
            )
            assert step["touched"] <= union and step["foreign"] == 0
        for step in sharded["steps"]:
            assert step["step"]["bytes_between_ranks"] == formulas.sharded_exchange_bytes(step["touched"], dim, layers)
            assert step["micro"]["bytes_between_ranks"] > 0  # routing all-gathers, rows fetched from their owners
            assert 0 < step["foreign"] <= step["touched"]
    replicated, sharded, bf16 = between["variants"]
    for v in (sharded, bf16):  # the formula of the sharded forward's bytes, from the run's own quantities
        assert v["forward_formula"] == pytest.approx(v["forward"], rel=1e-9)
    assert bf16["forward"] < sharded["forward"] and replicated["shard_default"] is False and sharded["shard_default"]
    assert replicated["store_bytes"] == 2 * sharded["store_bytes"] and all(v["node_pss"] > 0 for v in (sharded, bf16))
    # same model, data and init: in the first step the owners together update the union each replicated rank updates
    replicated_union = between["ranks"][0]["variants"][0]["steps"][0]["step"]["rows_updated"]
    owned = [rank["variants"][1]["steps"][0]["step"]["rows_updated"] for rank in between["ranks"]]
    assert sum(owned) == replicated_union
    nvme = section.data["nvme"]
    if nvme is None:  # no libaio here: skipped with a note
        assert any(note.startswith("NVMe tier skipped") for note in section.notes)
    else:
        store = nvme["store"]
        values = store["block_rows"] * dim * 4  # a block's values; its moments are 4 times that
        assert store["store_bytes"] == layers * 3 * neurons * 2 * dim * 4 >= 4 * store["ram_bytes"]
        assert store["bytes_written"] > 0 and store["bytes_written"] % (5 * values) == 0  # values + 2 moments
        assert 0 < store["forward_bytes_read"] < store["bytes_read"]
        assert store["bytes_read"] >= store["bytes_written"]  # the step reads what it writes back, plus cache misses
        assert store["bytes_read"] == sum(s["nvme_bytes_read"] for s in store["steps"])
        assert nvme["raw_aio"]["bytes"] == nvme["plain"]["bytes"] == RAW_MIN
        overlapped = nvme["overlapped"]  # the same steps, reads overlapping the FFN: the same bytes
        assert [overlapped[k] for k in ("bytes_read", "bytes_written", "forward_bytes_read", "rows_updated")] == [
            store[k] for k in ("bytes_read", "bytes_written", "forward_bytes_read", "rows_updated")
        ]
    assert section.columns[:4] == ["part", "variant", "rows / step (per rank)", "bytes / step (per rank)"]
    assert len(section.rows) == 4 + 3 * 2 + 3 + (4 if nvme is not None else 0)  # + sent at 2/4/8 ranks, memory
    assert section.rows[0][3] == fmt_bytes(between["variants"][0]["dense"])
    assert section.rows[1][3] == fmt_bytes(between["variants"][0]["total"])


def test_host_timeline_times_each_phase_and_puts_everything_back(context: Context) -> None:
    config = meft_ds.MeftConfig(num_neurons=64, top_k=4)
    model, optimizers = build_meft(tiny_model(), config, lr=1e-3)
    step = step_function(model, optimizers, context.batch)
    original = meft_ds.SparseKeyExpertAdapter._route
    record = {"seconds": timeline.timed_steps(step, 2), "steps": 2, "layers": 2}
    assert meft_ds.SparseKeyExpertAdapter._route is original, "the timers are removed"
    ms = timeline.per_layer_ms(record)
    for phase in ("routing (score + top-K)", "gather + cast of rows", "backward kernel (+ router's)"):
        assert ms[phase] > 0, phase
    assert 0 < ms["host"] < ms["step"] / 2
    rows = timeline.table(record, record)
    assert rows[0][0] == "host phase" and all(row[3] in ("1.00x", "-") for row in rows[1:-1])
