"""meft_ds's compiled CPU kernels equal their torch references (and build at all: CI must not fall back)."""

from __future__ import annotations

import subprocess

import pytest
import torch

from meft_ds.ops import MeftCPUBuilder, cpu_kernels, kernel_threads, read_cpu_info_once
from meft_ds.routing import score_probed_keys_torch, top_k_rows, union_of
from meft_ds.sparse_adam import adamw_torch_


@pytest.fixture(scope="module")
def kernels():
    built = cpu_kernels()
    assert built is not None, "the meft_cpu extension must build here (ninja + g++ are installed by setup)"
    return built


def test_deepspeed_reads_the_cpu_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """py-cpuinfo times the CPU in a subprocess (~1 s); DeepSpeed asks for a reading at every CPU op build and every
    DeepSpeedCPUAdam. After the first, no reading starts a process, and each caller gets its own copy."""
    cpuinfo = pytest.importorskip("cpuinfo")
    read_cpu_info_once()  # done when meft_ds was imported; a second call changes nothing
    first = cpuinfo.get_cpu_info()
    started: list[object] = []
    popen = subprocess.Popen.__init__

    def counted(self: subprocess.Popen, *args: object, **kwargs: object) -> None:
        started.append(args[0] if args else kwargs.get("args"))
        popen(self, *args, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", counted)
    builder = MeftCPUBuilder()
    flags = [builder.cpu_arch(), builder.simd_width(), builder.cpu_arch(), builder.simd_width()]
    again = cpuinfo.get_cpu_info()
    assert started == [], f"readings after the first started {started}"
    assert flags[:2] == flags[2:] and flags[0].startswith("-m")
    assert again == first and again is not first
    again["flags"].append("not_a_flag")
    assert "not_a_flag" not in cpuinfo.get_cpu_info()["flags"]


def test_row_adamw_matches_torch_and_touches_only_its_rows(kernels) -> None:
    rows, exp_avg, exp_avg_sq = torch.randn(50, 2, 24), torch.randn(50, 2, 24) * 0.1, torch.rand(50, 2, 24) * 0.1
    ids = torch.tensor([1, 7, 8, 30, 49])
    grads = torch.randn(5, 2, 24)
    state = [t.clone() for t in (rows, exp_avg, exp_avg_sq)]
    kernels.row_adamw_(*state, ids, grads, 4, 1e-2, 0.9, 0.99, 1e-8, 0.1, kernel_threads())
    expected = [t[ids].clone() for t in (rows, exp_avg, exp_avg_sq)]
    adamw_torch_(*expected[:1], grads, *expected[1:], step=4, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8,
                 weight_decay=0.1)  # fmt: skip
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[ids] = False
    for now, before, reference in zip(state, (rows, exp_avg, exp_avg_sq), expected, strict=True):
        torch.testing.assert_close(now[ids], reference, rtol=1e-6, atol=1e-7)
        assert torch.equal(now[untouched], before[untouched])


def test_row_adamw_rejects_out_of_range_ids(kernels) -> None:
    state = [torch.zeros(4, 2, 8) for _ in range(3)]
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.row_adamw_(*state, torch.tensor([4]), torch.zeros(1, 2, 8), 1, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gather_rows_casts_like_torch(kernels, dtype: torch.dtype) -> None:
    rows = torch.randn(40, 2, 16)
    ids = torch.tensor([0, 3, 39, 12])
    out = torch.empty(6, 2, 16, dtype=dtype)  # larger than needed, like a staging buffer
    kernels.gather_rows(rows, ids, out, kernel_threads())
    assert torch.equal(out[:4], rows[ids].to(dtype))


def test_score_probed_matches_the_torch_grouping(kernels) -> None:
    rows = torch.randn(96, 2, 20)
    keys = rows[:, 0]  # strided view, as the store hands it over
    hidden = torch.randn(9, 20)
    probe = torch.stack([torch.randperm(12)[:3] for _ in range(9)])
    scores = kernels.score_probed(hidden, probe, keys, 8, 0, kernel_threads())
    torch.testing.assert_close(scores, score_probed_keys_torch(hidden, probe, keys, 8), rtol=1e-5, atol=1e-5)


def test_score_probed_on_a_shard_scores_only_the_experts_it_holds(kernels) -> None:
    keys = torch.randn(96, 20)
    hidden = torch.randn(9, 20)
    probe = torch.stack([torch.randperm(12)[:3] for _ in range(9)])
    full = kernels.score_probed(hidden, probe, keys, 8, 0, kernel_threads())
    # experts 0-4 on one "rank", 5-11 on the other: each scores its own, the sum is the full result
    first = kernels.score_probed(hidden, probe, keys[:40], 8, 0, kernel_threads())
    second = kernels.score_probed(hidden, probe, keys[40:], 8, 5, kernel_threads())
    assert torch.equal(first + second, full)
    held_by_first = (probe < 5).repeat_interleave(8, dim=1)
    assert torch.all(first[~held_by_first] == 0) and torch.all(second[held_by_first] == 0)
    reference = score_probed_keys_torch(hidden, probe, keys[40:], 8, first_expert=5)
    torch.testing.assert_close(second, reference, rtol=1e-5, atol=1e-5)


def test_a_score_does_not_depend_on_the_tokens_scored_beside_it(kernels) -> None:
    keys = torch.randn(96, 37)  # 37: whole vectors and a tail on every SIMD width
    hidden = torch.randn(13, 37)
    probe = torch.randint(0, 3, (13, 2)) * torch.tensor([1, 4]) + torch.tensor([0, 1])  # many tokens per expert
    together = kernels.score_probed(hidden, probe, keys, 8, 0, kernel_threads())
    for t in range(13):  # alone, a token takes the kernel's one-token path
        alone = kernels.score_probed(hidden[t : t + 1], probe[t : t + 1], keys, 8, 0, kernel_threads())
        assert torch.equal(alone[0], together[t])


@pytest.mark.parametrize("gated", [True, False])
def test_select_top_k_matches_the_torch_topk_and_union(kernels, gated: bool) -> None:
    probe = torch.stack([torch.randperm(12)[:3] for _ in range(9)])
    scores = torch.randn(9, 3 * 8)
    gates = torch.rand(9, 3) + 0.1 if gated else None
    row_ids, union_pos, pick_scores = kernels.select_top_k(scores, probe, gates if gated else torch.empty(0), 8, 5, 1)
    reference = union_of(top_k_rows(scores, probe, gates, expert_size=8, top_k=5))
    assert torch.equal(row_ids, reference.row_ids)
    assert torch.equal(row_ids[union_pos].sort(1).values, reference.row_ids[reference.union_pos].sort(1).values)
    picked = row_ids[union_pos]  # each pick's score is its column's, ungated
    column = torch.stack([(probe[t] == picked[t, :, None] // 8).int().argmax(1) for t in range(9)]) * 8 + picked % 8
    assert torch.equal(pick_scores, scores.gather(1, column))


def test_select_top_k_ranks_nan_highest_and_breaks_ties_by_column(kernels) -> None:
    probe = torch.tensor([[2, 0], [1, 3]])
    scores = torch.zeros(2, 2 * 4)  # all tied: the lowest columns win
    scores[1, 6] = float("nan")
    row_ids, union_pos, _ = kernels.select_top_k(scores, probe, torch.empty(0), 4, 3, 2)
    picked = row_ids[union_pos].sort(1).values
    assert picked.tolist() == [[8, 9, 10], [4, 5, 14]]  # token 1: column 6 is expert 3's neuron 2


def test_routing_scores_each_pick_as_the_forward_kernel_does(kernels) -> None:
    # the adapter hands select_top_k's scores of the picks to the forward kernel instead of computing them again
    torch.manual_seed(0)
    tokens, dim, expert_size, threads = 13, 40, 8, kernel_threads()  # 40: a SIMD tail on every width
    rows = torch.randn(6 * expert_size, 2, dim)
    hidden = torch.randn(tokens, dim)
    probe = torch.stack([torch.randperm(6)[:3] for _ in range(tokens)])
    scores = kernels.score_probed(hidden, probe, rows[:, 0], expert_size, 0, threads)
    row_ids, union_pos, pick_scores = kernels.select_top_k(
        scores, probe, torch.rand(tokens, 3), expert_size, 5, threads
    )
    fetched, gate = rows[row_ids].contiguous(), torch.rand(tokens, 5)
    out, computed = kernels.sparse_adapter_forward(hidden, fetched, union_pos, gate, torch.empty(0), threads)
    assert torch.equal(computed.view(torch.int32), pick_scores.view(torch.int32)), "the same bits"
    out_known, kept = kernels.sparse_adapter_forward(hidden, fetched, union_pos, gate, pick_scores, threads)
    assert torch.equal(out_known, out) and kept.data_ptr() == pick_scores.data_ptr()
    _, halved = kernels.sparse_adapter_forward(hidden, fetched, union_pos, gate, pick_scores / 2, threads)
    assert torch.equal(halved, pick_scores / 2), "known scores are used, not computed"


def test_adapter_backward_matches_float64_with_the_same_bits_on_any_thread_count(kernels) -> None:
    # a token-parallel pass (x's and the gates' gradients) and a row-parallel one (the rows'): each value is summed by
    # one thread, in an order that does not depend on how many there are
    torch.manual_seed(0)
    tokens, dim, n, top_k = 37, 100, 30, 7  # 100: every SIMD tail of the 16-, 8- and 4-lane builds
    weights = 1.0 / torch.arange(1.0, n + 1)  # skewed: the first rows are picked by most tokens
    union_pos = torch.stack([torch.multinomial(weights, top_k) for _ in range(tokens)]).contiguous()
    x, rows = torch.randn(tokens, dim), torch.randn(n, 2, dim)
    gate = torch.rand(tokens, top_k) * 1.5 - 0.5  # some picks inactive
    grad_out = torch.randn(tokens, dim)
    grad_out[-3:] = 0  # padding tokens
    row_ids = torch.arange(n) * 3
    _, scores = kernels.sparse_adapter_forward(x, rows, union_pos, gate, torch.empty(0), 1)

    def backward(threads: int) -> tuple[torch.Tensor, ...]:
        acc, acc_ids = torch.empty(n, 2, dim), torch.empty(n, dtype=torch.long)
        entry_of = torch.full((3 * n,), -1, dtype=torch.long)
        grad_x, grad_gate, count, finite = kernels.sparse_adapter_backward(
            grad_out, x, rows, union_pos, gate, scores, row_ids, acc, acc_ids, entry_of, 0, 0, threads
        )
        assert finite
        return grad_x, grad_gate, acc_ids[:count], acc[:count]

    one = backward(1)
    for threads in (2, 3):
        assert all(torch.equal(a, b) for a, b in zip(backward(threads), one, strict=True)), threads
    x64, rows64 = x.double().requires_grad_(), rows.double().requires_grad_()
    gate64 = gate.double().requires_grad_()
    picked = rows64[union_pos]  # (T, K, 2, d)
    act = torch.relu(gate64 * torch.einsum("td,tkd->tk", x64, picked[:, :, 0]))
    torch.einsum("tk,tkd->td", act, picked[:, :, 1]).backward(grad_out.double())
    grad_x, grad_gate, ids, row_grads = one
    has_grad = rows64.grad.flatten(1).ne(0).any(1)
    assert 0 < int(has_grad.sum()) < n, "some rows picked only where inactive or by padding"
    assert torch.equal(ids, row_ids[has_grad]), "entries taken in the order of U, only for rows with a gradient"
    for ours, reference in ((grad_x, x64.grad), (grad_gate, gate64.grad), (row_grads, rows64.grad[has_grad])):
        torch.testing.assert_close(ours.double(), reference, rtol=1e-5, atol=1e-5)


def test_gate_backward_matches_autograd_through_the_dense_router(kernels) -> None:
    torch.manual_seed(0)
    tokens, dim, num_experts, top_k = 7, 12, 9, 5
    x = torch.randn(tokens, dim, dtype=torch.float64)
    weight = torch.randn(num_experts, dim, dtype=torch.float64)
    experts = torch.randint(0, num_experts - 2, (tokens, top_k))  # repeats within a token; the last 2 unused
    grad_gate = torch.randn(tokens, top_k, dtype=torch.float64)
    grad_gate[0, 1] = 0.0  # an inactive (token, expert) pair

    x_ref, weight_ref = x.clone().requires_grad_(), weight.clone().requires_grad_()
    (x_ref @ weight_ref.T).gather(1, experts).backward(grad_gate)
    grad_x, grad_weight = kernels.gate_backward(grad_gate.float(), x.float(), weight.float(), experts, kernel_threads())
    torch.testing.assert_close(grad_x, x_ref.grad.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_weight, weight_ref.grad.float(), rtol=1e-5, atol=1e-6)
    assert not grad_weight[-2:].any(), "experts no token uses get no gradient"


def test_gate_backward_rejects_out_of_range_experts(kernels) -> None:
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.gate_backward(torch.ones(2, 1), torch.ones(2, 3), torch.ones(4, 3), torch.tensor([[0], [4]]), 1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_all_finite_finds_one_bad_value_anywhere(kernels, bad: float) -> None:
    grads = torch.randn(37, 2, 1000)  # several 64 KB blocks and a ragged last one, split across the threads
    assert kernels.all_finite(grads, kernel_threads())
    for position in (0, 16383, 16384, 50_000, grads.numel() - 1):
        poisoned = grads.clone()
        poisoned.view(-1)[position] = bad
        assert not kernels.all_finite(poisoned, kernel_threads()), position
        assert not kernels.all_finite(poisoned, 1), position


def test_all_finite_takes_extreme_finite_values(kernels) -> None:
    # a sum of these overflows to inf; each of them is finite
    extreme = torch.full((3, 2, 8), torch.finfo(torch.float32).max)
    extreme[1] = -0.0
    assert kernels.all_finite(extreme, kernel_threads())
    assert kernels.all_finite(torch.empty(0, 2, 8), kernel_threads())
