"""Bytes each GPU sends per optimizer step, and how long that takes at a bus bandwidth.

Volumes follow NCCL's bus-bandwidth convention, in which an all-reduce of S bytes over N GPUs
moves 2 (N-1)/N S per GPU and an all-gather or reduce-scatter (N-1)/N S, so the time of any of
them is the bytes each GPU sends divided by the bus bandwidth nccl-tests reports (``busbw``).
Per optimizer step, with P parameters, gradients in the communication dtype and parameters in
the compute dtype:

- ZeRO-0: one gradient all-reduce (at the accumulation boundary);
- ZeRO-1: one gradient reduce-scatter at the boundary, one all-gather of the updated parameters;
- ZeRO-2: a reduce-scatter every micro-batch, one all-gather of the updated parameters;
- ZeRO-3: every micro-batch gathers the parameters for forward and again for backward (and
  again for each activation-checkpointed block it recomputes) and reduce-scatters the gradients.

Defaults, when no ``--bus-bandwidth-gbs`` is given (line rates of an H100/H200 SXM system, so a
lower bound on the time; nccl-tests on such systems typically reach 70-90% of them):
NVLink 4 moves 450 GB/s each way per GPU (900 GB/s total), used up to ``gpus_per_node`` GPUs;
beyond one node, each GPU's 400 Gb/s NDR InfiniBand adapter (50 GB/s; DGX H100/H200 have one
per GPU) is the limit.
"""

from __future__ import annotations

from dataclasses import dataclass

NVLINK_GBS = 450.0
INFINIBAND_GBS = 50.0


@dataclass(frozen=True)
class Collectives:
    gradient_bytes: int  # sent per GPU per step to reduce gradients
    parameter_bytes: int  # sent per GPU per step to gather parameters

    @property
    def total(self) -> int:
        return self.gradient_bytes + self.parameter_bytes


def collectives(stage: int, n_params: int, world: int, grad_bytes: int, param_bytes: int, accum: int,
                recomputed_fraction: float) -> Collectives:
    """Per-GPU volume of one optimizer step (module doc). ``recomputed_fraction``: share of the
    blocks whose forward is recomputed in backward (activation checkpointing)."""
    if world <= 1:
        return Collectives(0, 0)
    f = (world - 1) / world
    grads = f * n_params * grad_bytes
    params = f * n_params * param_bytes
    if stage == 0:
        return Collectives(round(2 * grads), 0)
    if stage == 1:
        return Collectives(round(grads), round(params))
    if stage == 2:
        return Collectives(round(accum * grads), round(params))
    return Collectives(round(accum * grads), round(accum * (2 + recomputed_fraction) * params))


def bus_bandwidth_gbs(world: int, gpus_per_node: int, given: float | None) -> float:
    """The bus bandwidth a collective over ``world`` GPUs runs at (module doc for the defaults)."""
    if given is not None:
        return given
    return NVLINK_GBS if world <= gpus_per_node else INFINIBAND_GBS


def step_time_s(compute_s: float | None, comm_s: float, overlap: bool) -> float | None:
    """Compute plus communication; with ``deepspeed.overlap_comm`` they overlap, and the longer
    of the two is the step."""
    if compute_s is None:
        return None
    return max(compute_s, comm_s) if overlap else compute_s + comm_s
