"""A config's peak memory per GPU and step time at N GPUs, before anything is launched.

The peak of a rank is the largest of three moments of a run:

- forward/backward: parameters + optimizer states + DeepSpeed buffers + gradients + the model's
  buffers + one micro-batch's activations (traced, :mod:`pretrain.plan.activations`) + what
  DeepSpeed holds during backward (reduce buckets, gathered ZeRO-3 parameters);
- optimizer step: the same without activations, plus the step's own copies of the gradients;
- start-up: while the engine is built (the model as built, flattening, optimizer initialisation).

Model states come from DeepSpeed's layout (:mod:`pretrain.plan.states`), collectives from
:mod:`pretrain.plan.network`. A one-GPU ``pretrain bench`` JSON supplies the compute time per
token; without one, ``step_time_s`` is null.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from pretrain.config import Config
from pretrain.engine import (
    builds_partitioned,
    deepspeed_config,
    param_groups,
    precision_path,
    schedule_horizon,
)
from pretrain.errors import UserError
from pretrain.model import Transformer
from pretrain.plan.activations import ActivationTrace, trace
from pretrain.plan.network import Collectives, bus_bandwidth_gbs, collectives, step_time_s
from pretrain.plan.states import ModelStates, ZeroLayout, model_states, zero_layout

GIB = 2**30
# The micro-batch search stops here: beyond, a trace's chunked loss runs thousands of chunks, and
# no one trains with more sequences per GPU per micro-step.
MAX_MICRO_BATCH = 1024
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class GpuPlan:
    """The plan of one rank at ``gpus`` data-parallel GPUs (the rank with the most bytes)."""

    gpus: int
    states: ModelStates
    activations: ActivationTrace
    phases: dict[str, int]  # forward_backward, step, startup: bytes alive at the peak of each
    memory_bytes: int  # what one rank may use
    comm: Collectives
    bus_gbs: float
    compute_s: float | None
    overlap: bool
    max_micro_batch: int | None = field(default=None)

    @property
    def total_bytes(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)  # type: ignore[arg-type]

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.memory_bytes

    @property
    def comm_s(self) -> float:
        return self.comm.total / (self.bus_gbs * 1e9)

    @property
    def step_time_s(self) -> float | None:
        return step_time_s(self.compute_s, self.comm_s, self.overlap)

    def as_json(self) -> dict[str, Any]:
        s = self.states
        return {
            "gpus": self.gpus, "total_bytes": self.total_bytes, "fits": self.fits,
            "max_micro_batch": self.max_micro_batch, "step_time_s": _round(self.step_time_s),
            "peak_phase": self.peak_phase, "phases": self.phases, "params_bytes": s.params, "grads_bytes": s.grads,
            "optimizer_bytes": s.optimizer, "deepspeed_buffers_bytes": s.buffers,
            "model_buffers_bytes": self.activations.model_buffers, "activation_bytes": self.activations.peak,
            "loss_temp_bytes": self.activations.loss_temp, "backward_temp_bytes": s.backward_temp,
            "step_temp_bytes": s.step_temp, "host_bytes": s.host, "comm_bytes": self.comm.total,
            "bus_bandwidth_gbs": self.bus_gbs, "comm_s": _round(self.comm_s), "compute_s": _round(self.compute_s),
        }


class Planner:
    """Plans of one config. The model is built once on fake tensors; activation traces are
    cached per micro-batch size."""

    def __init__(self, cfg: Config, target: str = "cuda"):
        if cfg.train.precision == "auto":  # what auto picks on an Ampere-or-newer GPU
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision="bf16"))
        self.cfg, self.target = cfg, target
        path = precision_path(cfg)
        self.param_dtype = DTYPES[path.params]
        self.autocast_dtype = DTYPES[path.autocast] if path.autocast else None
        self.groups = parameter_groups(cfg)
        self.n_params = sum(map(sum, self.groups))
        self._traces: dict[int, ActivationTrace] = {}

    def layout(self, world: int) -> ZeroLayout:
        cfg = self.cfg
        return zero_layout(deepspeed_config(cfg, world, on_cuda=self.target == "cuda"), precision_path(cfg),
                           schedule_horizon(cfg, world))

    def activations(self, micro_batch: int) -> ActivationTrace:
        if micro_batch not in self._traces:
            c = self.cfg
            t = trace(c.model, micro_batch, c.data.seq_len, self.param_dtype, self.autocast_dtype, self.target)
            if builds_partitioned(c):  # zero.Init creates the model's fp32 tables (RoPE) in the engine's dtype
                t = dataclasses.replace(t, model_buffers=t.model_buffers * self.param_dtype.itemsize // 4)
            self._traces[micro_batch] = t
        return self._traces[micro_batch]

    def phases(self, states: ModelStates, act: ActivationTrace) -> dict[str, int]:
        held = states.after_backward + act.model_buffers
        return {
            "forward_backward": held + act.peak + states.backward_temp,
            "step": held + states.step_temp,
            "startup": states.startup + act.model_buffers,
        }

    def plan(self, gpus: int, memory_bytes: int, bench: dict | None = None, bus_gbs: float | None = None,
             gpus_per_node: int = 8, find_max_micro_batch: bool = True) -> GpuPlan:
        c = self.cfg
        layout = self.layout(gpus)
        states = model_states(layout, self.groups, gpus)
        act = self.activations(c.train.micro_batch_size)
        comm = collectives(layout.stage, self.n_params, gpus, layout.param_bytes, layout.param_bytes,
                           c.train.grad_accum_steps, recomputed_fraction(c))
        plan = GpuPlan(gpus, states, act, self.phases(states, act), memory_bytes, comm,
                       bus_bandwidth_gbs(gpus, gpus_per_node, bus_gbs), compute_time_s(c, bench),
                       layout.overlap_comm)
        if find_max_micro_batch:
            plan.max_micro_batch = self.max_micro_batch(states, memory_bytes)
        return plan

    def max_micro_batch(self, states: ModelStates, memory_bytes: int) -> int:
        """The largest micro-batch whose peak fits in ``memory_bytes`` (0: none does)."""
        act = self.activations(self.cfg.train.micro_batch_size)
        phases = self.phases(states, act)
        if max(phases["step"], phases["startup"]) > memory_bytes:  # neither depends on the micro-batch
            return 0
        return self.largest_micro_batch(memory_bytes - (phases["forward_backward"] - act.peak))

    def largest_micro_batch(self, budget: int) -> int:
        """The largest micro-batch (up to MAX_MICRO_BATCH) whose activation peak is at most
        ``budget`` bytes.

        Activations grow linearly with the micro-batch, with a steeper slope where a later part
        of the step takes over the peak (a convex function once the loss chunks are full), so
        each guess follows the line through two traced micro-batches and is then traced; a
        micro-batch fits as the largest when the next one is traced too large, or when the slope
        up to it already says so. Traces are shared by every GPU count of the plan.
        """
        def peak(mb: int) -> int:
            return self.activations(mb).peak

        m = self.cfg.train.micro_batch_size
        peak(m), peak(m + 1)
        while True:
            traced = sorted(self._traces)
            lo = max((x for x in traced if peak(x) <= budget), default=0)
            hi = min((x for x in traced if peak(x) > budget), default=None)
            if lo == 0:
                if 1 in traced:
                    return 0
                peak(1)
                continue
            if hi == lo + 1 or lo >= MAX_MICRO_BATCH:
                return min(lo, MAX_MICRO_BATCH)
            below = max((x for x in traced if x < lo), default=None)
            if below is not None and peak(lo) + (peak(lo) - peak(below)) / (lo - below) > budget:
                return lo
            x0, x1 = (lo, hi) if hi is not None else (below, lo)
            slope = max(1.0, (peak(x1) - peak(x0)) / (x1 - x0))  # type: ignore[operator]
            guess = min(MAX_MICRO_BATCH, max(lo + 1, lo + math.floor((budget - peak(lo)) / slope)))
            peak(guess if hi is None else min(guess, hi - 1))


def parameter_groups(cfg: Config) -> list[list[int]]:
    """Element counts of the engine's optimizer groups (pretrain.engine.param_groups), from the
    model built on the meta device: no memory, whatever its size."""
    with torch.device("meta"):
        model = Transformer(dataclasses.replace(cfg.model, compile=False, attention="sdpa"))
    groups, _ = param_groups(model, cfg.optim)
    return [[p.numel() for p in g["params"]] for g in groups]


def recomputed_fraction(cfg: Config) -> float:
    """Share of the blocks whose forward runs again in backward (activation checkpointing; under
    ``selective`` the block runs again too, its matmuls answered from what was kept)."""
    m = cfg.model
    if m.activation_checkpointing in ("full", "selective"):
        return 1.0
    if m.activation_checkpointing == "every_n":
        return math.ceil(m.n_layers / m.checkpoint_every_n) / m.n_layers
    return 0.0


def compute_time_s(cfg: Config, bench: dict | None) -> float | None:
    """One GPU's compute time for this config's tokens per step, at the bench's time per token."""
    if bench is None:
        return None
    per_token = bench["step_time_s_median"] / bench["tokens_per_step"]
    t = cfg.train
    return t.micro_batch_size * t.grad_accum_steps * cfg.data.seq_len * per_token


def check_bench(bench: dict, cfg: Config, n_params: int, path: str) -> None:
    """A bench JSON must come from one GPU running the same model at the same sequence length."""
    missing = [k for k in ("step_time_s_median", "tokens_per_step", "world_size", "params", "seq_len") if k not in bench]
    if missing:
        raise UserError(f"--bench-json {path}: not a `pretrain bench` result (missing {', '.join(missing)})")
    if bench["world_size"] != 1:
        raise UserError(f"--bench-json {path}: ran on {bench['world_size']} ranks; the plan needs a one-GPU bench")
    if bench["params"] != n_params or bench["seq_len"] != cfg.data.seq_len:
        raise UserError(f"--bench-json {path}: benched a model of {bench['params']:,} parameters at sequence "
                        f"{bench['seq_len']}, this config has {n_params:,} at {cfg.data.seq_len}")


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)
