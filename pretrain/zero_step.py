"""ZeRO-1/2's optimizer step on flat partitions, decided on the device.

DeepSpeed's ``DeepSpeedZeroOptimizer.step`` walks every parameter of the partition three times per
step: an ``amax``/``amin`` NaN/Inf test, a norm, and finally ``.item()`` on the result to decide on
the host whether to update; then it copies the new weights back and re-points every parameter at
its slice of the flat buffer. :class:`FlatZeroStep` keeps DeepSpeed's data layout (the flat
low-precision buffers, the fp32 partition this rank updates, the optimizer state and so the
checkpoint format) and the gradient reduction in backward, and replaces only the step:

1. the global norm from this rank's reduced gradient partition (one multi-tensor kernel per
   parameter group, accumulated in fp64 as DeepSpeed's) and one all-reduce (the partitions are
   disjoint), turned into ``found_inf`` and the clip divisor by :class:`pretrain.optimizer.StepGuard`;
2. per group, one flat fp32 copy of the partition (one group at a time, as DeepSpeed) and
   :class:`pretrain.optimizer.GuardedAdamW` on the fp32 master partition (clip and skip inside
   the fused kernel), then one copy into the low-precision partition;
3. DeepSpeed's all-gather of the updated parameters.

Nothing reads a device value, so the host never waits.

ZeRO-1 also gets flat gradients (:class:`FlatGradsZeroStep`): DeepSpeed copies each gradient twice
per step through per-parameter hooks (into a reduction bucket, then into a partition buffer).
There every parameter's ``.grad`` is instead a view into one flat buffer per group with exactly
the layout of the parameters' own flat buffer, so backward accumulates in place and the step
reduces each group with one collective (reduce-scatter, or an all-reduce on gloo). ZeRO-2 keeps
DeepSpeed's hooks: they reduce gradients bucket by bucket during backward so that no rank ever
holds them all, which is ZeRO-2's memory promise.

Supported: bf16 and fp32 without optimizer offload, MoE, ZenFlow, model parallelism or a separate
gradient-accumulation dtype (:func:`adopt` refuses anything else; the engine only calls it on the
path :func:`pretrain.engine.precision_path` names ``device``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from deepspeed.runtime.utils import all_gather_dp_groups
from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID, DeepSpeedZeroOptimizer

from pretrain.optimizer import StepGuard, squared_norm


class FlatZeroStep(DeepSpeedZeroOptimizer):
    """A ``DeepSpeedZeroOptimizer`` whose ``step`` never syncs the host (see module doc).

    Instances are DeepSpeed's own, re-classed by :func:`adopt` after ``deepspeed.initialize``: the
    constructor, backward hooks, ``state_dict`` and checkpoint loading stay DeepSpeed's.
    """

    guard: StepGuard

    @torch.no_grad()
    def step(self, closure=None):
        self.micro_step_id = INITIAL_MICRO_STEP_ID
        reduced = [self._reduced_partition(i) for i in range(len(self.bit16_groups))]
        # The global norm: this rank's partitions (one multi-tensor kernel per group), summed over
        # the ranks (the partitions are disjoint).
        squares = [squared_norm(pieces) / divisor**2 for pieces, divisor in reduced if pieces]
        squared = torch.stack(squares).sum() if squares else torch.zeros((), dtype=torch.float64, device=self.device)
        dist.all_reduce(squared, group=self.dp_process_group)
        self.guard.set_squared_norm(squared)
        self._global_grad_norm = self.guard.norm
        for i, (pieces, divisor) in enumerate(reduced):  # one group's fp32 gradient at a time, as DeepSpeed
            master = self.single_partition_of_fp32_groups[i]
            master.grad = self._fp32_gradient(i, pieces, divisor)
            self._optimizer_step(i)  # GuardedAdamW: divides by the clip divisor, skips on found_inf
            master.grad = None
            self._release_gradients(i)
            rank = dist.get_rank(group=self.real_dp_process_group[i])
            self.parallel_partitioned_bit16_groups[i][rank].data.copy_(master.data)
        # The parameters are views into bit16_groups_flat (set up by DeepSpeed): the all-gather
        # writes them in place, so DeepSpeed's per-parameter re-pointing is not needed.
        all_gather_dp_groups(groups_flat=self.bit16_groups_flat,
                             partitioned_param_groups=self.parallel_partitioned_bit16_groups,
                             dp_process_group=self.real_dp_process_group,
                             start_alignment_factor=self.nccl_start_alignment_factor,
                             allgather_bucket_size=self.allgather_bucket_size)

    def _reduced_partition(self, i: int) -> tuple[list[torch.Tensor], int]:
        """This rank's partition of group ``i``'s gradient, already reduced over the ranks, as
        low-precision pieces, and what it must still be divided by (DeepSpeed has averaged it)."""
        self.free_grad_in_param_list(self.params_not_in_partition[i])
        flat = self._get_preflattened_grad_partition(i)
        return ([flat] if flat is not None else list(self.averaged_gradients[i])), 1

    def _fp32_gradient(self, i: int, pieces: list[torch.Tensor], divisor: int) -> torch.Tensor:
        """Group ``i``'s partition as one flat fp32 tensor (DeepSpeed's flattening and padding)."""
        group = self.real_dp_process_group[i]
        if len(pieces) == 1 and pieces[0].numel() == self.partition_size[i]:
            flat = pieces[0].view(-1)
        elif dist.get_rank(group=group) == dist.get_world_size(group=group) - 1:
            flat = self.flatten_dense_tensors_aligned(pieces, int(self.partition_size[i]))
        else:
            flat = self.flatten(pieces)
        return flat.to(self.single_partition_of_fp32_groups[i].dtype)

    def _release_gradients(self, i: int) -> None:
        self.free_grad_in_param_list(self.params_in_partition[i])
        self._release_preflattened_grad_buffers(i)
        self.averaged_gradients[i] = None
        self.all_grad_tensors[i] = None


class FlatGradsZeroStep(FlatZeroStep):
    """ZeRO-1 with gradients in flat buffers (see module doc): no per-parameter hook or copy."""

    flat_grads: list[torch.Tensor]

    def _use_flat_grads(self) -> None:
        for hook in self._grad_acc_hooks:
            hook.remove()
        self._grad_acc_hooks = []
        self.flat_grads = [torch.zeros_like(flat) for flat in self.bit16_groups_flat]
        self._point_grads()

    def _point_grads(self) -> None:
        """Each parameter's ``.grad`` = its slice of the group's flat gradient buffer (the same
        offsets as its data in ``bit16_groups_flat``); autograd then accumulates into it in place.
        Only parameters whose ``.grad`` is missing (none after the first call) cost an operator."""
        for i, flat in enumerate(self.flat_grads):
            for p, meta, offset in zip(self.round_robin_bit16_groups[i], self.round_robin_bit16_meta[i],
                                       self.round_robin_bit16_offsets[i], strict=True):
                if p.grad is None:
                    p.grad = flat.narrow(0, offset, meta.numel()).view(meta.shape)

    # DeepSpeed's backward hooks and their epilogues have nothing to do: the reduction is in step().
    def backward_epilogue(self, *args, **kwargs):
        pass

    def reduce_gradients(self, pipeline_parallel=False):
        pass

    def overlapping_partition_gradients_reduce_epilogue(self):
        pass

    def zero_grad(self, set_to_none=True):
        """Zero the flat buffers (DeepSpeed sets ``.grad = None``, which would detach the views)."""
        for flat in self.flat_grads:
            flat.zero_()
        self._point_grads()  # repairs a .grad someone set to None

    def _reduced_partition(self, i: int) -> tuple[list[torch.Tensor], int]:
        """This rank's slice of group ``i``'s flat gradient, summed over the ranks (one
        reduce-scatter; an all-reduce on gloo, which has none): divide by the ranks."""
        group = self.real_dp_process_group[i]
        world, rank = dist.get_world_size(group=group), dist.get_rank(group=group)
        flat = self.flat_grads[i]
        size = flat.numel() // world
        if world == 1:
            return [flat], 1
        if dist.get_backend(group) == "nccl":
            part = torch.empty(size, dtype=flat.dtype, device=flat.device)
            dist.reduce_scatter_tensor(part, flat, group=group)
            return [part], world
        dist.all_reduce(flat, group=group)
        return [flat.narrow(0, rank * size, size)], world

    def _fp32_gradient(self, i: int, pieces: list[torch.Tensor], divisor: int) -> torch.Tensor:
        grad = pieces[0].to(self.single_partition_of_fp32_groups[i].dtype)
        return grad.div_(divisor) if divisor > 1 else grad

    def _release_gradients(self, i: int) -> None:
        pass  # the flat buffer stays: zero_grad zeroes it after the step


def adopt(optimizer: DeepSpeedZeroOptimizer, guard: StepGuard) -> FlatZeroStep:
    """Give DeepSpeed's ZeRO-1/2 optimizer the flat, device-side step, and ZeRO-1 flat gradients
    (in place; returns it). Call right after ``deepspeed.initialize``, before any backward."""
    unsupported = [what for what, on in (
        ("optimizer offload", optimizer.cpu_offload), ("MoE", optimizer.has_moe_layers),
        ("ZenFlow", getattr(optimizer, "zenflow", False)), ("fp16 loss scaling", optimizer.dtype == torch.float16),
        ("model parallelism", optimizer.model_parallel_world_size > 1),
        ("a separate gradient-accumulation dtype", optimizer.use_separate_grad_accum),
    ) if on]
    if unsupported or type(optimizer) is not DeepSpeedZeroOptimizer:
        raise RuntimeError(f"the flat ZeRO step does not support {', '.join(unsupported) or type(optimizer).__name__}")
    optimizer.guard = guard
    if optimizer.partition_gradients:  # ZeRO-2
        optimizer.__class__ = FlatZeroStep
    else:
        optimizer.__class__ = FlatGradsZeroStep
        optimizer._use_flat_grads()
    return optimizer
