"""Our config -> a DeepSpeed config dict -> ``deepspeed.initialize``.

One source of truth: every DeepSpeed setting is derived from the ``train``, ``optim`` and
``deepspeed`` sections here (``deepspeed.extra`` is merged last for advanced keys), the result is
logged and written to ``<run.dir>/ds_config.json``, and nothing else builds DeepSpeed configs.

The optimizer is ours, handed to DeepSpeed as a client optimizer, so weight-decay groups and the
implementation choice are explicit: DeepSpeed's CPU Adam with ``deepspeed.offload_optimizer``
(a JIT-built C++ op: ninja + a compiler, built once into ~/.cache/torch_extensions), otherwise
:class:`pretrain.optimizer.GuardedAdamW` (``torch.optim.AdamW(fused=True)``, one fused kernel per
tensor list instead of ~10 foreach passes).

Which tensors exist in which dtype, and who runs the optimizer step, is one decision:
:func:`precision_path` (read by the engine, the benches and the memory planner). On the main
paths (bf16 or fp32, ZeRO 0-2, no offload) the step never waits on the host: the non-finite
check, clipping and the learning rate stay on the device (pretrain/optimizer.py,
pretrain/zero_step.py). Elsewhere (fp16, ZeRO-3, offload) DeepSpeed's own step decides on the
host, skips non-finite updates on every rank and does not advance the schedule, as before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pretrain.config import Config, deep_merge
from pretrain.errors import ConfigError, UserError
from pretrain.fileio import write_text_atomic
from pretrain.fp8 import check_fp8_support, convert_to_fp8
from pretrain.schedules import lr_multiplier

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrecisionPath:
    """What one rank holds for the model, in which dtype, and who runs the optimizer step.

    ``params``: the module's parameters (what forward reads); ``autocast``: the dtype forward
    computes in under ``torch.autocast`` (DeepSpeed's ``torch_autocast`` section), None without;
    ``grads``: gradients as backward produces and DeepSpeed reduces them; ``master``: a separate
    copy the optimizer updates (None: it updates the parameters themselves); ``optim_states``: the
    two Adam moments; ``sharded``: what ZeRO divides over the data-parallel ranks; ``offloaded``:
    what lives in CPU memory; ``step``: ``device`` = our step, which never waits on the host
    (pretrain/optimizer.py, pretrain/zero_step.py), ``deepspeed`` = DeepSpeed's own, which reads
    its overflow flag on the host.
    """

    params: str
    autocast: str | None
    grads: str
    master: str | None
    optim_states: str
    sharded: tuple[str, ...]
    offloaded: tuple[str, ...]
    step: str

    def model_state_bytes_per_param(self, dp_world: int) -> dict[str, float]:
        """Bytes per model parameter of each persistent model state on one rank (no buffers)."""
        size = {"fp32": 4, "bf16": 2, "fp16": 2}

        def share(kind: str) -> float:
            return 1 / dp_world if kind in self.sharded else 1.0

        out = {"params": size[self.params] * share("params"), "grads": size[self.grads] * share("grads"),
               "optim_states": 2 * size[self.optim_states] * share("optimizer")}
        if self.master is not None:
            out["master"] = size[self.master] * share("optimizer")
        return out


def precision_path(cfg: Config) -> PrecisionPath:
    """The precision and optimizer path of ``cfg`` (train.precision resolved: bf16, fp16 or fp32).

    - ZeRO-0, bf16: fp32 parameters and gradients, forward under bf16 autocast: the parameters are
      the master weights, so DeepSpeed calls our fused AdamW directly (nanoGPT's recipe: no
      wrapper, no per-parameter copies); same bytes as bf16 weights + an fp32 master copy.
    - ZeRO-1/2, bf16: bf16 parameters and gradients in DeepSpeed's flat buffers, an fp32 master
      partition per rank, stepped by :class:`pretrain.zero_step.FlatZeroStep`.
    - fp32: the same without autocast (ZeRO-1/2 still keep DeepSpeed's separate fp32 partition).
    - fp16, ZeRO-3 or optimizer offload: DeepSpeed's wrappers and step (loss scaling, partitioned
      parameters, CPU Adam).
    """
    t, ds = cfg.train, cfg.deepspeed
    stage, precision = ds.zero_stage, t.precision
    if precision not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"train.precision={precision!r} must be resolved first (pretrain.engine.resolve_precision)")
    sharded = ((), ("optimizer",), ("optimizer", "grads"), ("optimizer", "grads", "params"))[stage]
    offloaded = tuple(k for k, on in (("optimizer", ds.offload_optimizer), ("params", ds.offload_params)) if on)
    step = "device" if precision != "fp16" and stage <= 2 and not ds.offload_optimizer else "deepspeed"
    if stage == 0 and precision != "fp16":
        autocast = "bf16" if precision == "bf16" else None
        return PrecisionPath("fp32", autocast, "fp32", None, "fp32", sharded, offloaded, step)
    return PrecisionPath(precision, None, precision, "fp32", "fp32", sharded, offloaded, step)


def deepspeed_config(cfg: Config, dp_world: int, on_cuda: bool = False) -> dict:
    """The DeepSpeed config dict for ``cfg`` at data-parallel size ``dp_world``."""
    t, ds = cfg.train, cfg.deepspeed
    path = precision_path(cfg)
    zero: dict[str, Any] = {
        "stage": ds.zero_stage,
        "overlap_comm": ds.overlap_comm,
        "contiguous_gradients": ds.contiguous_gradients,
        "reduce_bucket_size": ds.reduce_bucket_size,
    }
    if ds.zero_stage in (1, 2):
        zero["allgather_bucket_size"] = ds.allgather_bucket_size
        zero["reduce_scatter"] = True
    if ds.zero_stage == 3:
        zero["stage3_prefetch_bucket_size"] = ds.stage3_prefetch_bucket_size
        zero["stage3_param_persistence_threshold"] = ds.stage3_param_persistence_threshold
        # Export and elastic resume consolidate from the shards; no 16-bit copy at save time.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_cuda}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_cuda}

    conf: dict[str, Any] = {
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * dp_world,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        # The device step clips itself (it needs the pre-clip norm to detect NaN/Inf).
        "gradient_clipping": 0.0 if path.step == "device" else t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": path.params == "bf16"},
        "fp16": {
            "enabled": t.precision == "fp16",
            "loss_scale": 0,  # dynamic
            "initial_scale_power": ds.fp16_initial_scale_power,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # we log; DeepSpeed's own progress lines would duplicate it
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer synchronizes the device at every forward and step: two full
        # host waits per step. The loop measures throughput itself (pretrain.monitor.Throughput).
        "timers": {"throughput": {"enabled": False}},
    }
    if path.params == "bf16":
        conf["bf16"]["check_grad_overflow"] = True  # DeepSpeed's own step (ZeRO-3): skip NaN/Inf steps
    if path.autocast:
        conf["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return deep_merge(conf, ds.extra)


def native_bf16(accelerator: str) -> bool:
    """Whether this device runs bf16 matmuls in hardware. A CPU without avx512_bf16 or AMX falls
    back to PyTorch's reference GEMM for bf16 (measured ~0.6 GFLOP/s on an AVX2 EPYC core, against
    tens for fp32 through MKL), so bf16 there is a trap, not a saving."""
    import torch  # lazy: callers check the config before the heavy imports

    if accelerator == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001 - older builds lack the probe
        return False


def resolve_precision(cfg: Config, accelerator: str) -> Config:
    """``train.precision=auto`` -> the concrete precision for this device (see the config help);
    an explicit bf16 on a device without native bf16 runs, with a warning that says what it costs."""
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if native_bf16(accelerator) else ("fp16" if accelerator == "cuda" else "fp32")
        log.info("train.precision=auto -> %s on %s", precision, accelerator)
        return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision))
    if precision == "bf16" and accelerator == "cpu" and not native_bf16(accelerator):
        log.warning("train.precision=bf16 on a CPU without avx512_bf16/AMX: bf16 matmuls run through a "
                    "reference GEMM, far slower than fp32; set train.precision=fp32 or auto")
    return cfg


def check_device_support(cfg: Config, accelerator: str) -> None:
    """Precision/device combinations the hardware cannot run, before any process group starts."""
    import torch

    if cfg.train.precision == "fp16" and accelerator == "cpu":
        ok = False
        try:
            ok = bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
        except Exception:  # noqa: BLE001 - older builds lack the probe
            ok = False
        if not ok:
            raise ConfigError("train.precision=fp16 is not supported on this CPU; use train.precision=bf16 or fp32")
    if accelerator == "cuda" and cfg.train.precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.precision=bf16 needs an Ampere or newer GPU; use train.precision=fp16")
    check_fp8_support(cfg, accelerator)


# --------------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------------


@dataclass
class ParamGroupSummary:
    decay: int
    no_decay: int


def param_groups(model, optim_cfg) -> tuple[list[dict], ParamGroupSummary]:
    """AdamW groups: matrices decay; norms and biases (1-D) and embeddings per optim.decay_*.

    A tied output projection shares the embedding tensor, so it follows optim.decay_embeddings.
    """
    import torch.nn as nn

    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # named_parameters de-duplicates tied tensors
        if not p.requires_grad:
            continue
        if id(p) in embedding_ids:
            wanted = optim_cfg.decay_embeddings
        elif p.ndim < 2:
            wanted = optim_cfg.decay_norms
        else:
            wanted = True
        (decay if wanted else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": optim_cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    summary = ParamGroupSummary(sum(p.numel() for p in decay), sum(p.numel() for p in no_decay))
    return [g for g in groups if g["params"]], summary


def build_optimizer(cfg: Config, model, guard):
    """The client optimizer handed to DeepSpeed (see module doc for the choice); ``guard`` is the
    device step's :class:`pretrain.optimizer.StepGuard`, None where DeepSpeed runs its own step."""
    from pretrain.optimizer import GuardedAdamW  # lazy: torch loads after the config is checked

    groups, summary = param_groups(model, cfg.optim)
    o = cfg.optim
    kw = {"lr": o.lr, "betas": (o.beta1, o.beta2), "eps": o.eps}
    if cfg.deepspeed.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        try:
            opt = DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
        except Exception as e:  # the op is JIT-compiled on first use
            raise UserError(
                f"deepspeed.offload_optimizer=true needs DeepSpeed's CPU Adam op, which failed to build ({e}); "
                "install ninja and a C++ compiler, or set deepspeed.offload_optimizer=false"
            ) from e
        kind = "DeepSpeedCPUAdam"
    else:
        # ZeRO-0: DeepSpeed calls it with the full, all-reduced gradients, so it takes the norm itself.
        opt = GuardedAdamW(groups, guard, owns_norm=cfg.deepspeed.zero_stage == 0, **kw)
        kind = "AdamW(fused), " + ("clip and skip on the device" if guard is not None else "DeepSpeed clips and skips")
    log.info(
        "optimizer %s: %.2fM params with weight decay %.3g, %.2fM without (decay_norms=%s, decay_embeddings=%s)",
        kind, summary.decay / 1e6, o.weight_decay, summary.no_decay / 1e6, o.decay_norms, o.decay_embeddings,
    )
    return opt


def schedule_horizon(cfg: Config, dp_world: int) -> int:
    """Steps the LR schedule spans: train.max_steps, or fewer when train.max_tokens ends the run first."""
    t = cfg.train
    steps = t.max_steps
    if t.max_tokens is not None:
        per_step = t.micro_batch_size * t.grad_accum_steps * dp_world * cfg.data.seq_len
        steps = min(steps, -(-t.max_tokens // per_step))
    return max(steps, 1)


# --------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------


def builds_partitioned(cfg: Config) -> bool:
    """ZeRO-3 with ``deepspeed.zero3_init``: the model is built inside ``deepspeed.zero.Init``
    (which also creates the model's other floating-point tensors in the engine's dtype)."""
    return cfg.deepspeed.zero_stage == 3 and cfg.deepspeed.zero3_init


def model_init_context(cfg: Config, info) -> contextlib.AbstractContextManager:
    """Where to build the model: under ZeRO-3 (with ``deepspeed.zero3_init``) inside
    ``deepspeed.zero.Init``, which partitions each module's parameters as soon as it is built, so
    a model larger than one device (or one host's memory, counted over its ranks) can be built at
    all; otherwise a no-op."""
    if not builds_partitioned(cfg):
        return contextlib.nullcontext()
    import deepspeed

    conf = deepspeed_config(cfg, info.world_size, on_cuda=info.device.startswith("cuda"))
    return deepspeed.zero.Init(config_dict_or_path=conf, remote_device="cpu" if cfg.deepspeed.offload_params else None)


def build_engine(cfg: Config, model, info, run_dir: str | os.PathLike | None):
    """Wrap ``model`` in a DeepSpeed engine; returns ``(engine, guard)``.

    ``guard`` is the device step's :class:`pretrain.optimizer.StepGuard` (None where DeepSpeed runs
    its own step, see :func:`precision_path`). The DeepSpeed config is logged and, on rank 0,
    written to ``run_dir/ds_config.json``.
    """
    import deepspeed  # lazy: DS_ACCELERATOR must be chosen (pretrain.dist) before deepspeed loads

    from pretrain.optimizer import (  # lazy: torch loads after the config is checked
        LRSchedule,
        StepGuard,
    )

    path = precision_path(cfg)
    conf = deepspeed_config(cfg, info.world_size, on_cuda=info.device.startswith("cuda"))
    text = json.dumps(conf, indent=2, sort_keys=True)
    log.info("DeepSpeed config:\n%s", text)
    log.info("precision path: %s", path)
    if run_dir is not None and info.rank == 0:
        write_text_atomic(Path(run_dir) / "ds_config.json", text + "\n")

    if cfg.train.fp8:  # before the optimizer: Float8Linear keeps the same weight parameters
        convert_to_fp8(model)
    guard = StepGuard(cfg.train.grad_clip, info.device) if path.step == "device" else None
    optimizer = build_optimizer(cfg, model, guard)
    horizon = schedule_horizon(cfg, info.world_size)
    factor = lr_multiplier(cfg.optim, horizon)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lambda opt: LRSchedule(opt, factor, cfg.optim.lr, horizon, guard, info.device),
        config=conf,
        dist_init_required=False,
    )
    if guard is not None and cfg.deepspeed.zero_stage in (1, 2):
        from pretrain.zero_step import adopt  # lazy: imports deepspeed, chosen above

        adopt(engine.optimizer, guard)
    if cfg.deepspeed.zero_stage == 0 and info.world_size == 1:
        # One rank: DeepSpeed's gradient all-reduce would flatten, "reduce" and copy every
        # gradient back unchanged (a mean over one rank multiplies by nothing).
        engine.enable_backward_allreduce = False
    return engine, guard


class HostStepOutcome:
    """Where DeepSpeed runs its own step (ZeRO-3, fp16, offload) it decides on the host; its
    outcome is written into two device scalars in place. ``fill_`` only queues a kernel, where a
    new device tensor per step would be a host-to-device copy that waits for the step's kernels."""

    def __init__(self, device: str):
        import torch  # lazy: see build_optimizer

        self.found_inf = torch.zeros((), dtype=torch.float32, device=device)
        self.norm = torch.zeros((), dtype=torch.float32, device=device)

    def read(self, engine):
        import torch  # lazy: see build_optimizer

        self.found_inf.fill_(0.0 if engine.was_step_applied() else 1.0)
        norm = engine.get_global_grad_norm()
        if isinstance(norm, torch.Tensor):
            self.norm.copy_(norm)
        else:
            self.norm.fill_(float("nan") if norm is None else norm)
        return self.found_inf, self.norm


def step_outcome(engine, guard):
    """The last optimizer step's ``(found_inf, global gradient norm)`` as device tensors, read by
    nobody until the loop's next logging step (pretrain.stepstats). ``guard``: the device step's
    StepGuard, or a :class:`HostStepOutcome` where DeepSpeed steps."""
    if isinstance(guard, HostStepOutcome):
        return guard.read(engine)
    return guard.found_inf, guard.norm


def grad_clip_of(engine) -> float | None:
    """The gradient clip the engine applies: the device step's guard's, or DeepSpeed's own."""
    opt = getattr(engine, "optimizer", None)
    guard = getattr(opt, "guard", None)
    return guard.grad_clip if guard is not None else getattr(opt, "clip_grad", None)


def loss_scale(engine) -> float | None:
    """Current fp16 loss scale; None in bf16/fp32."""
    if not engine.fp16_enabled():
        return None
    opt = engine.optimizer
    for attr in ("cur_scale", "loss_scale"):
        v = getattr(opt, attr, None)
        if v is not None:
            return float(v)
    return None


def param_counts(engine) -> tuple[int, int]:
    """(parameters of the whole model, parameter elements this rank holds).

    Under ZeRO-3 a parameter's own tensor is an empty placeholder: ``ds_numel`` is its full size
    and ``ds_tensor`` this rank's partition. Below stage 3 every rank holds everything.
    """
    params = list(engine.module.parameters())
    total = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params)
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    return total, local
