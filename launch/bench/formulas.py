"""Analytic byte counts, against which the experiments' measurements are set.

a. What DeepSpeed 0.19.8's ZeRO-2 with ``offload_optimizer: cpu`` moves between host and device for a dense
trainable tensor of ``N`` elements, read from ``deepspeed/runtime/zero/stage_1_and_2.py`` (bf16 compute, default
fp32 master weights, ``grad_accum_dtype`` unset, so it equals the compute dtype and the "compact" fp32 device buffer
is not used):

* ``copy_grads_in_partition`` at every micro-step of an accumulation window with ``G > 1`` calls
  ``async_accumulate_grad_in_cpu_via_gpu``: from the second micro-step on, it first copies the CPU accumulation buffer
  to the device (``accumulate_gradients``: host->device ``2N`` bytes) and adds, then always copies the sum back
  (``copy_gradients_to_cpu``: device->host ``2N``).
* at the boundary micro-step, ``async_inplace_copy_grad_to_fp32_buffer_from_gpu`` casts the gradient to fp32 on the
  device and copies it into the CPU fp32 partition (device->host ``4N``).
* ``step`` runs the CPU Adam, then copies the bf16 parameters back (``bit16_partitions[...].copy_``: host->device
  ``2N``).

So per optimizer step, with ``G >= 2``: host->device ``2N*G``, device->host ``2N*G + 4N``; with ``G = 1``: ``2N`` and
``4N``. The "minimal" offload (one bf16 gradient copy per micro-step, one bf16 parameter copy per step) is shown too,
as the most favourable case for the dense adapter.

f. What a rank moves between data-parallel ranks per optimizer step. Two measures. "Put in": the bytes a rank hands
to the collectives, what ``meft_ds.stats``'s ``bytes_between_ranks`` counts (a rank's own share of an all-to-all
included); the formulas reproduce the 2-rank measurement exactly (the experiment checks it). "Sent": the bytes a
rank sends to the other ranks over the network, with ring all-gathers (``(W - 1)`` times its part) and ring
all-reduces (``2 (W - 1) / W`` of the tensor), and all-to-alls whose parts go to every rank alike (``(W - 1) / W``
of what it puts in leaves it). "Sent" is what scales with the number of ranks ``W``; at ``W`` = 4 and 8 it is
evaluated with a rank's own quantities (tokens, rows fetched, rows touched) as measured at 2 ranks, since each rank
keeps its micro-batch: the routing and the rows a rank needs do not depend on ``W``, only who owns them.

Per layer and micro-batch a sharded store's rank (``T`` tokens, ``n_probe`` probes, ``s`` rows per expert, ``d``
wide, hidden states of ``h`` bytes per value and rows of ``b``): the token count (8 B) and its hidden states
``T d h`` and probes ``2 T n_probe`` (int16) are all-gathered; it sends the scores of the pairs it owns, ``4 s`` each
(on average ``T n_probe`` pairs); per owner a request count (8 B), then the ids of the ``U`` rows it fetches (8 B
each) and the rows it serves (``2 d b`` each, on average ``U``). At the optimizer step each touched row's id and fp32
gradient goes to its owner (``8 + 8 d`` per row).
"""

from __future__ import annotations

from dataclasses import dataclass

BF16 = 2
FP32 = 4


@dataclass(frozen=True)
class OffloadBytes:
    """Bytes one optimizer step moves each way."""

    to_device: float
    to_host: float

    @property
    def total(self) -> float:
        return self.to_device + self.to_host


def zero_offload_bytes(
    num_params: int, accum_steps: int, *, compute_bytes: int = BF16, master_bytes: int = FP32
) -> OffloadBytes:
    """Per optimizer step, DeepSpeed 0.19.8 ZeRO-2 CPU offload as coded (see a. above)."""
    if accum_steps < 1:
        raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")
    # in: the accumulated gradients at every micro-step after the first, the parameters once (G = 1: only those)
    grads_out = compute_bytes * num_params * accum_steps if accum_steps > 1 else 0  # G = 1: no accumulation buffer
    return OffloadBytes(compute_bytes * num_params * accum_steps, grads_out + master_bytes * num_params)


def minimal_offload_bytes(num_params: int, accum_steps: int, *, compute_bytes: int = BF16) -> OffloadBytes:
    """Per optimizer step, the least any gradient offload can move: each micro-step's gradient out once, the
    updated parameters back once."""
    return OffloadBytes(to_device=compute_bytes * num_params, to_host=compute_bytes * num_params * accum_steps)


def dense_adapter_params(num_layers: int, neurons: int, dim: int) -> int:
    """Elements of a dense parallel adapter: keys and values, ``r x d`` each, per layer."""
    return 2 * neurons * dim * num_layers


ID_BYTES = 8  # row ids and counts travel as int64
GRAD_BYTES = 4  # row gradients travel in fp32
PROBE_BYTES = 2  # probed expert ids travel as int16 (up to 32768 experts)
SCORE_BYTES = 4  # scores travel in fp32


def dense_allreduce_bytes(neurons: int, dim: int, layers: int, element_bytes: int = GRAD_BYTES) -> int:
    """What a dense adapter of ``neurons`` rows (keys and values, ``2 r d`` values per layer) puts into the gradient
    all-reduce of one optimizer step, per rank."""
    return layers * 2 * neurons * dim * element_bytes


def replicated_exchange_bytes(touched: int, union: int, dim: int, layers: int) -> int:
    """``bytes_between_ranks`` of one replicated-store exchange: this rank's touched row ids (all-gather) and the
    gradients laid out over the ranks' union (all-reduce), spread evenly over the layers' counters."""
    return layers * ((touched * ID_BYTES + union * 2 * dim * GRAD_BYTES) // layers)


def sharded_exchange_bytes(touched: int, dim: int, layers: int) -> int:
    """``bytes_between_ranks`` of one sharded-store exchange: every touched row's id and gradient sent to its owner
    (all-to-all; the part a rank owns itself goes through the collective too)."""
    return layers * ((touched * (ID_BYTES + 2 * dim * GRAD_BYTES)) // layers)


@dataclass
class RankLoad:
    """What one rank routes, fetches and touches per optimizer step (its own quantities: independent of ``W``)."""

    tokens: int  # per micro-batch
    micro_steps: int
    layers: int
    fetched: float  # rows fetched per micro-batch, summed over the layers (the unions U)
    touched: float  # rows holding a gradient at the optimizer step, all layers
    dim: int
    n_probe: int
    expert_size: int
    hidden_bytes: int  # bytes per hidden-state value as they travel (the row dtype)
    row_bytes: int  # bytes per row value as they travel


def sharded_forward_put_in(load: RankLoad, world: int) -> float:
    """A sharded store's forward ``bytes_between_ranks`` per optimizer step, averaged over the ranks."""
    per_layer = (
        ID_BYTES
        + load.tokens * load.dim * load.hidden_bytes
        + load.tokens * load.n_probe * PROBE_BYTES
        + load.tokens * load.n_probe * load.expert_size * SCORE_BYTES
        + world * ID_BYTES
    )
    rows = load.fetched * (ID_BYTES + 2 * load.dim * load.row_bytes)
    return load.micro_steps * (load.layers * per_layer + rows)


def sharded_sent(load: RankLoad, world: int) -> dict[str, float]:
    """Bytes a rank sends to the other ranks per optimizer step with sharded stores, by part."""
    spread = (world - 1) / world  # of an all-to-all, what leaves the rank
    micro = load.micro_steps * load.layers
    return {
        "hidden": micro * (world - 1) * (2 * ID_BYTES + load.tokens * load.dim * load.hidden_bytes),
        "probes and scores": micro
        * (
            (world - 1) * load.tokens * load.n_probe * PROBE_BYTES
            + spread * load.tokens * load.n_probe * load.expert_size * SCORE_BYTES
        ),
        "rows": load.micro_steps * load.fetched * spread * (ID_BYTES + 2 * load.dim * load.row_bytes),
        "exchange": load.touched * spread * (ID_BYTES + 2 * load.dim * GRAD_BYTES),
    }


def dense_sent(neurons: int, dim: int, layers: int, world: int, element_bytes: int = GRAD_BYTES) -> float:
    """Bytes a rank sends in a ring all-reduce of a dense adapter's gradients."""
    return 2 * (world - 1) / world * dense_allreduce_bytes(neurons, dim, layers, element_bytes)
