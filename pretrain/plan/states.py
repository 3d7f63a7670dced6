"""Bytes DeepSpeed allocates on one rank for parameters, gradients and optimizer states.

Everything is read from the generated DeepSpeed config (``pretrain.engine.deepspeed_config``),
the engine's own parameter groups and the engine's precision path (``pretrain.engine.precision_path``:
who runs the optimizer step), never re-derived from our config keys: when the engine changes what
it hands DeepSpeed, the plan follows, and the exactness test (plan against the bytes a real engine
holds at 1, 2 and 4 ranks, ZeRO 0-3) says when the bookkeeping below needs updating. The layouts
mirror DeepSpeed 0.19 and our device step (pretrain/optimizer.py, pretrain/zero_step.py):

- ZeRO-0, fp32 (also bf16, which trains fp32 parameters under autocast): DeepSpeed calls our AdamW
  on the parameters themselves (fp32 moments); with more than one rank its all-reduce flattens the
  gradients bucket by bucket.
- ZeRO-0, fp16: ``FP16_UnfusedOptimizer``: an fp32 master copy of every parameter; its step
  converts every gradient to fp32 at once.
- ZeRO-1/2: each parameter group flattened into one buffer padded to a multiple of 2 x ranks;
  each rank owns an equal slice of it (fp32 master + moments). ZeRO-1 on the device step keeps
  every gradient in one flat buffer per group with the parameters' layout, for the whole run.
  Otherwise, after backward a rank holds the gradients of the whole parameters that overlap its
  slice, in one contiguous buffer. The step converts one group's slice to fp32 at a time.
- The device step's learning-rate table: one fp32 per step of the schedule, for the whole run.
- ZeRO-3: every parameter split in ``ceil(numel / ranks)`` pieces; parameters at or below
  ``stage3_param_persistence_threshold`` elements stay whole on every rank as well (when there
  is more than one). The gradient partitions and one reduce bucket are allocated once, at start-up; the step works through
  sub-groups of at most ``sub_group_size`` elements.

Scalars (optimizer step counters, the gradient norm, the overflow flag) are left out: a few
bytes each.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from pretrain.dist import select_accelerator
from pretrain.errors import UserError

# DeepSpeed's engine flattens ZeRO-0 gradients into buckets of this many elements for the
# all-reduce (deepspeed.runtime.engine.MEMORY_OPT_ALLREDUCE_SIZE, the default of allreduce_gradients).
ZERO0_ALLREDUCE_BUCKET = 500_000_000
FP32 = 4

# DeepSpeed settings that change what is allocated in ways this plan does not model.
UNMODELLED = {
    ("zero_optimization", "round_robin_gradients"): "reorders the gradient partitions",
    ("zero_optimization", "bf16_master_weights_and_grads"): "keeps bf16 master weights",
    ("zero_optimization", "fp16_master_weights_and_grads"): "keeps fp16 master weights",
    ("zero_optimization", "bf16_optimizer_states"): "keeps bf16 optimizer states",
    ("zero_optimization", "zero_hpz_partition_size"): "adds a secondary parameter partition",
    ("zero_optimization", "zero_quantized_weights"): "quantizes the gathered weights",
    ("zero_optimization", "zero_quantized_gradients"): "quantizes the reduced gradients",
}


class UnplannableError(UserError):
    """The generated DeepSpeed config uses a memory layout the plan does not model."""


@dataclass(frozen=True)
class ZeroLayout:
    """The DeepSpeed choices that decide memory per rank, from the generated DeepSpeed config."""

    stage: int
    param_bytes: int  # element size of the parameters the model computes with (and of their gradients)
    master_copy: bool  # an fp32 master copy next to the parameters (bf16/fp16, or ZeRO >= 1)
    reduce_bucket_size: int
    overlap_comm: bool
    contiguous_gradients: bool
    prefetch_bucket_size: int
    persistence_threshold: int
    sub_group_size: int
    offload_optimizer: bool
    offload_params: bool
    grad_accum_steps: int
    device_step: bool = False  # our step (pretrain.engine.precision_path): no DeepSpeed clip or overflow copies
    flat_grads: bool = False  # ZeRO-1 on the device step: every gradient in one flat buffer, always
    schedule_bytes: int = 0  # the device step's learning-rate table


def zero_layout(ds_conf: dict, path, schedule_steps: int) -> ZeroLayout:
    """Read the memory-relevant choices from a DeepSpeed config dict (DeepSpeed's own defaults
    for keys the dict leaves out) and the engine's precision path (``path``, a
    ``pretrain.engine.PrecisionPath``) for a schedule of
    ``schedule_steps`` steps. Raises :class:`UnplannableError` for layouts not modelled."""
    select_accelerator()  # before deepspeed loads (pretrain.dist)
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig  # lazy: after select_accelerator

    for (section, key), what in UNMODELLED.items():
        value = ds_conf.get(section, {}).get(key)
        if value not in (None, False, 0) and not (key == "zero_hpz_partition_size" and value == 1):  # 1: off
            raise UnplannableError(f"the DeepSpeed config sets {section}.{key}={value!r}, which {what}; "
                                   "pretrain plan does not model that memory layout")
    if (ds_conf.get("data_types") or {}).get("grad_accum_dtype") not in (None,):
        raise UnplannableError("the DeepSpeed config sets data_types.grad_accum_dtype, which switches "
                               "DeepSpeed to a separate gradient-accumulation buffer; pretrain plan does not model it")
    zero = DeepSpeedZeroConfig(**ds_conf.get("zero_optimization", {}))
    half = ds_conf.get("bf16", {}).get("enabled") or ds_conf.get("fp16", {}).get("enabled")
    stage = int(zero.stage)
    device_step = path.step == "device"
    offload_opt = zero.offload_optimizer is not None and str(zero.offload_optimizer.device) not in ("none", "OffloadDeviceEnum.none")
    offload_par = zero.offload_param is not None and str(zero.offload_param.device) not in ("none", "OffloadDeviceEnum.none")
    return ZeroLayout(
        stage=stage,
        param_bytes=2 if half else FP32,
        master_copy=bool(half) or stage > 0,
        reduce_bucket_size=int(zero.reduce_bucket_size),
        overlap_comm=bool(zero.overlap_comm),
        contiguous_gradients=bool(zero.contiguous_gradients),
        prefetch_bucket_size=int(zero.prefetch_bucket_size),
        persistence_threshold=int(zero.param_persistence_threshold),
        sub_group_size=int(zero.sub_group_size),
        offload_optimizer=offload_opt,
        offload_params=offload_par,
        grad_accum_steps=int(ds_conf.get("gradient_accumulation_steps", 1)),
        device_step=device_step,
        flat_grads=device_step and stage == 1,
        schedule_bytes=(schedule_steps + 1) * FP32 if device_step else 0,
    )


@dataclass(frozen=True)
class ModelStates:
    """Bytes on one rank's device. ``params`` + ``optimizer`` + ``buffers`` stay allocated for
    the whole run; ``grads`` are held from backward to the end of the step (ZeRO-3: always);
    the ``*_temp`` fields are the largest short-lived allocations of one phase; ``host`` is what
    offload keeps in CPU memory instead."""

    params: int
    grads: int
    master: int  # fp32 master weights
    moments: int  # AdamW exp_avg + exp_avg_sq
    buffers: int  # DeepSpeed buffers allocated once (ZeRO-3 reduce bucket)
    backward_temp: int  # during backward: reduce buckets (ZeRO-1/2), gathered parameters (ZeRO-3)
    step_temp: int  # during the optimizer step: fp32 gradient copies, overflow checks
    startup: int  # the most bytes alive at once while the engine is built (before any step)
    host: int  # offloaded to CPU memory (not on the device)
    grads_persist: bool = False  # ZeRO-3 allocates its gradient partitions once, at start-up

    @property
    def optimizer(self) -> int:
        return self.master + self.moments

    @property
    def after_backward(self) -> int:
        """Held from the end of backward to the step (optimizer moments exist from the first step)."""
        return self.params + self.grads + self.optimizer + self.buffers

    @property
    def after_step(self) -> int:
        """Held between steps: what stays allocated for the whole run."""
        return self.after_backward - (0 if self.grads_persist else self.grads)


def model_states(layout: ZeroLayout, groups: list[list[int]], world: int, rank: int | None = None) -> ModelStates:
    """Bytes on data-parallel rank ``rank`` of ``world`` (None: the rank holding the most) for
    parameter groups ``groups`` (each optimizer group's element counts, in the engine's order)."""
    groups = [g for g in groups if g]  # DeepSpeed drops empty groups
    if layout.stage == 0:
        states = _zero0(layout, groups, world)
    elif layout.stage in (1, 2):
        states = _zero12(layout, groups, world, rank)
    else:
        states = _zero3(layout, groups, world)
    return dataclasses.replace(states, buffers=states.buffers + layout.schedule_bytes,
                               startup=states.startup + layout.schedule_bytes)


def _zero0(z: ZeroLayout, groups: list[list[int]], world: int) -> ModelStates:
    n = sum(map(sum, groups))
    largest = max(max(g) for g in groups)
    master = n * FP32 if z.master_copy else 0
    # The engine's all-reduce flattens the gradients bucket by bucket (after backward; our engine
    # skips it on one rank); FP16_UnfusedOptimizer converts every gradient to fp32 before its
    # step; DeepSpeed's clip takes the fp32 norm of one gradient at a time (the device step: none).
    allreduce = min(n, ZERO0_ALLREDUCE_BUCKET) * z.param_bytes if world > 1 or not z.device_step else 0
    step = max(allreduce, n * FP32 if z.master_copy else 0 if z.device_step else largest * FP32)
    # Start-up: the model as built (fp32) on the device; FP16_UnfusedOptimizer then initialises
    # its moments with one step over zero gradients in both dtypes.
    startup = max(n * FP32, n * (z.param_bytes + FP32 + z.param_bytes + FP32 + 2 * FP32) if z.master_copy else 0)
    return ModelStates(params=n * z.param_bytes, grads=n * z.param_bytes, master=master, moments=2 * n * FP32,
                       buffers=0, backward_temp=0, step_temp=step, startup=startup, host=0)


def zero12_partitions(numels: list[int], world: int) -> tuple[int, list[int]]:
    """One ZeRO-1/2 parameter group: (elements of each rank's slice, and per rank the elements of
    gradient it holds after backward). The flat buffer is padded to a multiple of 2 x ranks
    (DeepSpeed's 4-byte all-gather alignment). A rank holds the gradients of the whole parameters
    overlapping its slice (get_partition_info: starting in it, or straddling its start) plus
    zeros for the part of its slice past the last parameter."""
    total = sum(numels)
    alignment = 2 * world
    size = math.ceil(total / alignment) * alignment // world
    held = []
    for r in range(world):
        start, end, offset, count = size * r, size * (r + 1), 0, 0
        for n in numels:
            if start <= offset < end or offset < start < offset + n:
                count += n
            offset += n
        held.append(count + size - (min(end, total) - min(start, total)))
    return size, held


def _zero12(z: ZeroLayout, groups: list[list[int]], world: int, rank: int | None) -> ModelStates:
    flat = steps = 0
    slices, per_rank = [], [0] * world
    for numels in groups:
        size, held_by_rank = zero12_partitions(numels, world)
        flat += size * world
        per_rank = [a + b for a, b in zip(per_rank, held_by_rank, strict=True)]
        slices.append(size)
        # The step converts one group's slice at a time: a flat copy in the parameter dtype, then fp32.
        steps = max(steps, size * (z.param_bytes + FP32), max(numels) * FP32)  # (fp32 norm of the largest gradient)
    n = sum(map(sum, groups))
    held = (max(per_rank) if rank is None else per_rank[rank]) * z.param_bytes  # the rank's gradients after backward
    buckets = (2 if z.overlap_comm else 1) * z.reduce_bucket_size * z.param_bytes if z.contiguous_gradients else 0
    grads, backward = held, buckets
    if z.flat_grads:  # every gradient in the flat buffers, no reduce buckets (pretrain.zero_step)
        grads, backward = flat * z.param_bytes, 0
        steps = max(size * ((z.param_bytes if world > 1 else 0) + FP32) for size in slices)  # reduce-scatter out, fp32
    elif z.stage == 1 and not z.contiguous_gradients:
        grads = n * z.param_bytes  # whole gradients, reduced in place
    elif z.stage == 1 and z.grad_accum_steps > 1:
        # Before the accumulation boundary ZeRO-1 keeps whole gradients, and its reduce buckets
        # from the first backward on; the boundary's backward copies them into the rank's buffer.
        grads, backward = max(n * z.param_bytes + buckets, held), held
    elif z.stage == 2 and z.grad_accum_steps > 1:
        backward += held  # the next micro-batch's partition, before it is added to the running sum
    master = sum(slices) * FP32
    on_host = z.offload_optimizer
    return ModelStates(
        params=flat * z.param_bytes, grads=grads, master=0 if on_host else master, moments=0 if on_host else 2 * master,
        buffers=0, backward_temp=backward, step_temp=0 if on_host else steps,
        # the model as built (fp32) on the device; then the flattening copies the parameters once
        startup=max(n * FP32, 2 * flat * z.param_bytes), host=3 * master if on_host else 0,
        grads_persist=z.flat_grads,
    )


def zero3_sub_groups(numels: list[int], world: int, sub_group_size: int) -> list[int]:
    """Elements one rank holds of each of one group's ZeRO-3 sub-groups (DeepSpeed's
    _create_fp16_sub_groups: parameters in order until a sub-group reaches ``sub_group_size``)."""
    parts = [math.ceil(n / world) for n in numels]
    if sub_group_size >= sum(parts):
        return [sum(parts)]
    out, held = [], 0
    for i, p in enumerate(parts):
        held += p
        if held >= sub_group_size or i == len(parts) - 1:
            out.append(held)
            held = 0
    return out


def _zero3(z: ZeroLayout, groups: list[list[int]], world: int) -> ModelStates:
    numels = [n for g in groups for n in g]
    part = sum(math.ceil(n / world) for n in numels)
    # Persistent parameters stay whole (padded to a multiple of the ranks, as gathered) besides
    # their partition; on one rank that is the same tensor.
    persistent = sum(math.ceil(n / world) * world for n in numels if n <= z.persistence_threshold) if world > 1 else 0
    subs = [s for g in groups for s in zero3_sub_groups(g, world, z.sub_group_size)]
    params = (0 if z.offload_params else part * z.param_bytes) + persistent * z.param_bytes
    master = part * FP32
    buffers = z.reduce_bucket_size * z.param_bytes if z.contiguous_gradients else 0
    # Backward holds the parameters being computed with, whole (also on one rank: gathering
    # copies): the largest module's (its matrices arrive one by one, so the largest parameter
    # stands for it) plus the prefetch bucket.
    gathered = (max(numels) + min(z.prefetch_bucket_size, sum(numels))) * z.param_bytes
    # Step: isinf/isnan over the whole gradient buffer (one byte per element), then one
    # sub-group's gradients flattened and converted to fp32.
    on_host = z.offload_optimizer
    step = max(part, max(subs) * (z.param_bytes + FP32))
    # Start-up: DeepSpeed initialises the optimizer with an fp32 gradient buffer as large as the
    # largest sub-group.
    init_grads = 0 if on_host else max(subs) * FP32
    return ModelStates(
        params=params, grads=part * z.param_bytes, master=0 if on_host else master,
        moments=0 if on_host else 2 * master, buffers=buffers, backward_temp=gathered,
        step_temp=0 if on_host else step,
        startup=params + part * z.param_bytes + (0 if on_host else master) + buffers + init_grads,
        host=(3 * master if on_host else 0) + (part * z.param_bytes if z.offload_params else 0), grads_persist=True,
    )
