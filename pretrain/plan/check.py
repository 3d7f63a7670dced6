"""The start-up check of ``pretrain train``: this rank's planned peak against its memory.

Runs before the process group and the engine exist, on every rank alike (the plan is
deterministic, so all ranks take the same decision without talking). A config that cannot fit
stops with exit status 2 and one line: what does not fit, by how much, and which settings would
make it fit; ``train.ignore_memory_plan=true`` starts it anyway. On CPU, where ranks share the
host's memory with everything else running there, the check runs only when
``train.device_memory_gib`` says how much a rank may use.
"""

from __future__ import annotations

import dataclasses
import logging

from pretrain.config import Config, data_parallel_size
from pretrain.dist import local_rank, select_accelerator
from pretrain.engine import resolve_precision
from pretrain.errors import UserError
from pretrain.logging_setup import global_rank
from pretrain.plan.planner import GIB, GpuPlan, Planner
from pretrain.plan.states import UnplannableError

log = logging.getLogger(__name__)


def check_memory_plan(cfg: Config) -> None:
    """Raise :class:`UserError` when this rank's planned peak exceeds its device memory."""
    if cfg.train.ignore_memory_plan:
        log.info("memory plan: not checked (train.ignore_memory_plan=true)")
        return
    accelerator = select_accelerator()
    memory, device = device_memory(cfg, accelerator)
    if memory is None:
        log.info("memory plan: not checked on CPU (ranks share the host's memory; set train.device_memory_gib to check)")
        return
    cfg = resolve_precision(cfg, accelerator)
    world = data_parallel_size()
    try:
        planner = Planner(cfg, target=accelerator)
        plan = planner.plan(world, memory, find_max_micro_batch=False)
    except UnplannableError as e:
        log.warning("memory plan: not checked: %s", e)
        return
    log.info("memory plan: peak %.2f GiB per rank (%s) of %.2f GiB on %s",
             plan.total_bytes / GIB, plan.peak_phase.replace("_", "/"), memory / GIB, device)
    if plan.fits:
        return
    if global_rank() != 0:
        raise UserError("memory plan: this config does not fit in device memory (global rank 0 says by how much "
                        "and what would fit; train.ignore_memory_plan=true starts it anyway)")
    raise UserError(does_not_fit(planner, plan, device, world))


def device_memory(cfg: Config, accelerator: str) -> tuple[int | None, str]:
    """(bytes one rank may use, the device's name); None on CPU unless train.device_memory_gib is set."""
    given = cfg.train.device_memory_gib
    if accelerator == "cuda":
        import torch  # lazy: the check reads the device only on CUDA

        index = local_rank()
        props = torch.cuda.get_device_properties(index)
        total = props.total_memory if given is None else int(given * GIB)
        return total, f"cuda:{index} ({props.name})" + (" as train.device_memory_gib" if given is not None else "")
    return (None if given is None else int(given * GIB)), "this rank (train.device_memory_gib)"


def does_not_fit(planner: Planner, plan: GpuPlan, device: str, world: int) -> str:
    """One line: the peak, its parts, the shortfall, and the settings that would make it fit."""
    c, s, a = planner.cfg, plan.states, plan.activations
    parts = (f"parameters {s.params / GIB:.2f} + gradients {s.grads / GIB:.2f} + optimizer states "
             f"{s.optimizer / GIB:.2f}")
    if plan.peak_phase == "forward_backward":
        parts += (f" + activations {a.peak / GIB:.2f} (micro-batch {c.train.micro_batch_size} x {c.data.seq_len})"
                  f" + DeepSpeed buffers {(s.buffers + s.backward_temp) / GIB:.2f}")
    elif plan.peak_phase == "step":
        parts += f" + the optimizer step's gradient copies {s.step_temp / GIB:.2f}"
    fixes = [" ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in fix.items())
             for fix in fixes_that_fit(planner, plan, world)]
    return (f"memory plan: at {world} rank(s) each needs {plan.total_bytes / GIB:.2f} GiB at its peak "
            f"({plan.peak_phase.replace('_', '/')}: {parts} GiB) but {device} has {plan.memory_bytes / GIB:.2f} GiB, "
            f"{(plan.total_bytes - plan.memory_bytes) / GIB:.2f} GiB short; "
            + (f"would fit: {' | '.join(fixes)}" if fixes else "no single setting fits it: add GPUs or shrink the model")
            + "; or set train.ignore_memory_plan=true to start anyway")


def fixes_that_fit(planner: Planner, plan: GpuPlan, world: int) -> list[dict[str, object]]:
    """Settings, cheapest in throughput first, each of which alone makes the plan fit."""
    c = planner.cfg
    candidates: list[dict[str, object]] = [{"deepspeed.zero_stage": z} for z in range(c.deepspeed.zero_stage + 1, 4)]
    if c.model.activation_checkpointing in ("none", "every_n"):  # selective recomputes only elementwise ops
        candidates.append({"model.activation_checkpointing": "selective"})
    if c.model.activation_checkpointing != "full":
        candidates.append({"model.activation_checkpointing": "full"})
    best = planner.max_micro_batch(plan.states, plan.memory_bytes)
    if 0 < best < c.train.micro_batch_size:  # the same sequences per step: a divisor of them
        per_step = c.train.micro_batch_size * c.train.grad_accum_steps
        mb = max(d for d in range(1, best + 1) if per_step % d == 0)
        candidates.append({"train.micro_batch_size": mb, "train.grad_accum_steps": per_step // mb})
    if not c.deepspeed.offload_optimizer:
        candidates.append({"deepspeed.zero_stage": max(1, c.deepspeed.zero_stage), "deepspeed.offload_optimizer": True})
    fits = []
    for fix in candidates:
        other = Planner(with_settings(c, fix), target=planner.target)
        if other.plan(world, plan.memory_bytes, find_max_micro_batch=False).fits:
            fits.append(fix)
    return fits


def with_settings(cfg: Config, settings: dict[str, object]) -> Config:
    """``cfg`` with dotted ``settings`` applied (sections are dataclasses)."""
    for key, value in settings.items():
        section, name = key.split(".")
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: value})})
    return cfg
