"""Our config -> a DeepSpeed config dict -> ``deepspeed.initialize``.

One source of truth: every DeepSpeed setting is derived from the ``train``, ``optim`` and
``deepspeed`` sections here (``deepspeed.extra`` is merged last for advanced keys), the result is
logged and written to ``<run.dir>/ds_config.json``, and nothing else builds DeepSpeed configs.

The optimizer is ours, handed to DeepSpeed as a client optimizer, so weight-decay groups and the
implementation choice are explicit:

- ``deepspeed.offload_optimizer``: DeepSpeed's CPU Adam (a JIT-built C++ op; needs ninja + a
  compiler, built once into ~/.cache/torch_extensions);
- CUDA: ``torch.optim.AdamW(fused=True)``;
- CPU: ``torch.optim.AdamW(fused=True)`` (one fused kernel per tensor list instead of ~10 foreach
  passes: measurably cheaper on the bench shape, see the bench notes in the README).

Non-finite steps: every DeepSpeed optimizer wrapper (ZeRO 1-3, the bf16 and fp16 optimizers)
detects a NaN/Inf gradient norm, skips the update on all ranks and does not advance the LR
schedule. The one path without that check is ZeRO-0 in fp32, where DeepSpeed calls the client
optimizer directly; there :class:`GuardedAdamW` clips, records the norm and skips itself, exposing
the same ``overflow`` / ``_global_grad_norm`` attributes DeepSpeed reads from its own wrappers.
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


def uses_guarded_optimizer(cfg: Config) -> bool:
    """ZeRO-0 in fp32 is the one DeepSpeed path without a non-finite check (see module doc)."""
    return cfg.deepspeed.zero_stage == 0 and cfg.train.precision == "fp32"


def deepspeed_config(cfg: Config, dp_world: int, on_cuda: bool = False) -> dict:
    """The DeepSpeed config dict for ``cfg`` at data-parallel size ``dp_world``."""
    t, ds = cfg.train, cfg.deepspeed
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
        # GuardedAdamW clips itself (it must see the pre-clip norm to detect NaN/Inf).
        "gradient_clipping": 0.0 if uses_guarded_optimizer(cfg) else t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
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
    }
    if t.precision == "bf16":
        conf["bf16"]["check_grad_overflow"] = True  # skip NaN/Inf steps (explicit, it is the point)
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


def _torch_adamw_kwargs(optim_cfg) -> dict:
    return {"lr": optim_cfg.lr, "betas": (optim_cfg.beta1, optim_cfg.beta2), "eps": optim_cfg.eps}


def _make_guarded_adamw():
    import torch

    class GuardedAdamW(torch.optim.AdamW):
        """AdamW that clips by global norm and skips the update when that norm is NaN/Inf.

        Only for ZeRO-0 fp32 (see module doc): there gradients are already all-reduced when
        step() runs, so every rank computes the same norm and takes the same decision.
        """

        def __init__(self, params, max_norm: float, **kw):
            super().__init__(params, **kw)
            self.max_norm = max_norm
            self.overflow = False
            self._global_grad_norm: float | None = None

        @torch.no_grad()
        def step(self, closure=None):
            params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
            max_norm = self.max_norm if self.max_norm > 0 else float("inf")
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
            self._global_grad_norm = float(norm)
            self.overflow = not torch.isfinite(norm).item()
            if self.overflow:
                return None
            return super().step(closure)

    return GuardedAdamW


def build_optimizer(cfg: Config, model, on_cuda: bool):
    """The client optimizer handed to DeepSpeed (see module doc for the choice)."""
    import torch

    groups, summary = param_groups(model, cfg.optim)
    o = cfg.optim
    if cfg.deepspeed.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        try:
            opt = DeepSpeedCPUAdam(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, adamw_mode=True)
        except Exception as e:  # the op is JIT-compiled on first use
            raise UserError(
                f"deepspeed.offload_optimizer=true needs DeepSpeed's CPU Adam op, which failed to build ({e}); "
                "install ninja and a C++ compiler, or set deepspeed.offload_optimizer=false"
            ) from e
        kind = "DeepSpeedCPUAdam"
    elif uses_guarded_optimizer(cfg):
        opt = _make_guarded_adamw()(groups, max_norm=cfg.train.grad_clip, fused=True, **_torch_adamw_kwargs(o))
        kind = "GuardedAdamW(fused)"
    else:
        opt = torch.optim.AdamW(groups, fused=True, **_torch_adamw_kwargs(o))
        kind = "AdamW(fused)"
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
    """Wrap ``model`` in a DeepSpeed engine; returns ``(engine, ds_config)``.

    The config is logged and, on rank 0, written to ``run_dir/ds_config.json``.
    """
    import deepspeed  # lazy: DS_ACCELERATOR must be chosen (pretrain.dist) before deepspeed loads
    from torch.optim.lr_scheduler import LambdaLR

    on_cuda = info.device.startswith("cuda")
    conf = deepspeed_config(cfg, info.world_size, on_cuda=on_cuda)
    text = json.dumps(conf, indent=2, sort_keys=True)
    log.info("DeepSpeed config:\n%s", text)
    if run_dir is not None and info.rank == 0:
        write_text_atomic(Path(run_dir) / "ds_config.json", text + "\n")

    if cfg.train.fp8:  # before the optimizer: Float8Linear keeps the same weight parameters
        convert_to_fp8(model)
    optimizer = build_optimizer(cfg, model, on_cuda)
    factor = lr_multiplier(cfg.optim, schedule_horizon(cfg, info.world_size))
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lambda opt: LambdaLR(opt, factor),
        config=conf,
        dist_init_required=False,
    )
    return engine, conf


def grad_norm(engine) -> float | None:
    """The last step's global gradient norm as a float (None when DeepSpeed did not compute one)."""
    n = engine.get_global_grad_norm()
    if n is None:
        return None
    return float(n.item() if hasattr(n, "item") else n)


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
