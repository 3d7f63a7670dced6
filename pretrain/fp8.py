"""``train.fp8=true``: torchao float8 training for the Transformer's large Linear layers.

torchao's ``convert_to_float8_training`` swaps an ``nn.Linear`` for a ``Float8Linear`` whose
forward and backward matmuls run in float8 with dynamic (per-tensor) scaling, while the weight
stays a plain bf16/fp32 parameter: the optimizer, DeepSpeed's ZeRO-1/2 partitioning and the
checkpoint see the same tensors as without fp8. Only layers with both dimensions at least
:data:`MIN_DIM` (and multiples of 16, the float8 GEMM's requirement) are converted: on smaller
ones the casts cost more than the faster matmul gains. The output head is left alone (the fused
chunked loss uses its weight directly, not its forward).

Needs float8 tensor cores: CUDA compute capability >= 8.9 (Ada, Hopper and newer) and torchao.
Not checked on a GPU yet (docs/benchmarks.md): ZeRO-3 is refused, because its
parameter placeholders are swapped in and out under the module, which Float8Linear's weight
casts do not expect.
"""

from __future__ import annotations

import logging

from pretrain.config import Config
from pretrain.errors import ConfigError

log = logging.getLogger(__name__)

MIN_DIM = 1024


def check_fp8_support(cfg: Config, accelerator: str) -> None:
    """Refuse ``train.fp8=true`` where it cannot run, before any process group starts."""
    if not cfg.train.fp8:
        return
    import torch  # lazy: the config check runs before the heavy imports elsewhere too

    if accelerator != "cuda" or not torch.cuda.is_available():
        raise ConfigError(f"train.fp8=true needs a CUDA GPU with compute capability >= 8.9 (Ada/Hopper); "
                          f"this run is on {accelerator}")
    cap = torch.cuda.get_device_capability()
    if cap < (8, 9):
        raise ConfigError(f"train.fp8=true needs compute capability >= 8.9 (Ada/Hopper); "
                          f"{torch.cuda.get_device_name()} has {cap[0]}.{cap[1]}")
    if cfg.deepspeed.zero_stage == 3:
        raise ConfigError("train.fp8=true is not supported with deepspeed.zero_stage=3 (see pretrain/fp8.py); use 1 or 2")
    try:
        import torchao.float8  # noqa: F401 - lazy: optional dependency, only for fp8 runs
    except ImportError:
        raise ConfigError("train.fp8=true needs torchao (pip install torchao)") from None


def wants_fp8(module, fqn: str) -> bool:
    """Large Linear layers only (see module doc); the output head stays in the run's precision."""
    import torch.nn as nn  # lazy: pretrain.engine (imports this module) keeps torch out of its import

    if not isinstance(module, nn.Linear) or fqn.split(".")[-1] == "lm_head":
        return False
    return all(d >= MIN_DIM and d % 16 == 0 for d in (module.in_features, module.out_features))


def convert_to_fp8(model) -> int:
    """Swap the large Linear layers for torchao's Float8Linear in place; returns how many."""
    from torchao.float8 import convert_to_float8_training  # lazy: optional dependency

    n = sum(wants_fp8(m, name) for name, m in model.named_modules())
    convert_to_float8_training(model, module_filter_fn=wants_fp8)
    log.info("train.fp8: %d Linear layers compute in float8 (torchao, dynamic scaling)", n)
    return n
