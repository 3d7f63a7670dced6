"""Model FLOPs per token, peak FLOP/s per accelerator, and MFU.

MFU = achieved model FLOP/s / peak FLOP/s, with "model FLOPs" counting the math the model needs
(no recomputation from activation checkpointing, no padding columns), as in PaLM (Chowdhery et al.
2022, appendix B). An unknown device gives ``None`` (MFU "unavailable"), never a guessed peak.
"""

from __future__ import annotations

import functools
import logging
import time

from pretrain.model import ffn_hidden_size, n_kv_heads

log = logging.getLogger(__name__)


def matmul_params(model_cfg) -> int:
    """N of the 6N term: every parameter that does a matmul per token.

    That is all Transformer-block weights (norm weights included; they are negligible), the final
    norm, and the output projection counted with the *real* vocabulary (vocab_size x d_model,
    counted once even when tied to the input embedding, because the projection matmul happens
    either way). The input embedding is a lookup, not a matmul, so it is excluded.
    """
    d, hd = model_cfg.d_model, model_cfg.d_model // model_cfg.n_heads
    attn = 2 * d * d + 2 * d * n_kv_heads(model_cfg) * hd
    per_block = attn + 3 * d * ffn_hidden_size(model_cfg) + 2 * d
    return model_cfg.n_layers * per_block + d + model_cfg.vocab_size * d


def flops_per_token(model_cfg, seq_len: int) -> float:
    """Training FLOPs per token: 6N + 12 * L * H * Q * T (PaLM appendix B).

    N = :func:`matmul_params` (non-embedding parameters + output projection). L layers, H heads,
    Q head dim, T sequence length: the attention-score term counts QK^T and AV for the full T x T
    square, as PaLM does (a causal kernel skips half, so this slightly favours long sequences).
    """
    L, H = model_cfg.n_layers, model_cfg.n_heads
    Q = model_cfg.d_model // H
    return 6.0 * matmul_params(model_cfg) + 12.0 * L * H * Q * seq_len


# Dense (no structured sparsity) bf16/fp16 tensor-core peaks, FLOP/s.
# Sources: NVIDIA A100 datasheet (312 TFLOPS BF16 dense, 624 with sparsity; SXM and PCIe alike);
# NVIDIA H100 datasheet (SXM 989.4, PCIe 756.5, NVL 835.5 TFLOPS BF16 dense: half the sparse
# figures 1979 / 1513 / 1671); NVIDIA H200 datasheet (SXM 989 TFLOPS dense, 1979 sparse; the NVL
# card 835); NVIDIA Blackwell / DGX B200 datasheet (B200 2.25 PFLOPS dense FP16/BF16, 4.5 sparse).
_GPU_PEAK_BF16 = (
    # (substring of torch.cuda.get_device_name(), peak) -- first match wins, most specific first
    ("H100 PCIE", 756.5e12),
    ("H100 NVL", 835.5e12),
    ("H100", 989.4e12),
    ("H200 NVL", 835.5e12),
    ("H200", 989.4e12),
    ("GH200", 989.4e12),
    ("B200", 2.25e15),
    ("A100", 312e12),
)


def gpu_peak_flops(device_name: str, dtype: str = "bf16") -> float | None:
    """Peak for a GPU name such as 'NVIDIA H100 80GB HBM3'; None when the GPU or dtype is unknown."""
    if dtype not in ("bf16", "fp16"):
        return None  # fp32/tf32 peaks depend on settings; better no MFU than a wrong one
    name = device_name.upper()
    for key, peak in _GPU_PEAK_BF16:
        if key in name:
            return peak
    return None


def peak_flops_per_s(device: str, dtype: str = "bf16") -> float | None:
    """Peak FLOP/s of ``device`` ('cpu', 'cuda', 'cuda:N' or a GPU name) for ``dtype``.

    GPUs: the datasheet table above. CPU: a short matmul probe in ``dtype`` on this machine
    (cached per process). Anything else: None.
    """
    if device == "cpu":
        return cpu_matmul_peak(dtype)
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return None
        index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
        return gpu_peak_flops(torch.cuda.get_device_name(index), dtype)
    return gpu_peak_flops(device, dtype)


@functools.cache
def cpu_matmul_peak(dtype: str = "bf16", n: int = 1024, budget_s: float = 0.25) -> float | None:
    """Best sustained matmul FLOP/s of n x n x n products in ``dtype`` on this CPU, all threads.

    A short probe (~``budget_s`` after one warm-up product), not a datasheet: it measures the
    machine the run is on, with the thread count the run uses. Taking the best of several
    repetitions makes it robust to a neighbour stealing a core for a moment.
    """
    import torch

    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(dtype)
    if dt is None:
        return None
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dt)
    b = torch.randn(n, n, generator=gen).to(dt)
    out = torch.empty(n, n, dtype=dt)
    torch.matmul(a, b, out=out)  # warm-up: kernel selection, page faults
    best = float("inf")
    deadline = time.perf_counter() + budget_s
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        torch.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    peak = 2.0 * n**3 / best
    log.info("CPU %s matmul probe: %.3f TFLOP/s (%d threads)", dtype, peak / 1e12, torch.get_num_threads())
    return peak


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1]; None when the peak is unknown."""
    if peak is None or peak <= 0:
        return None
    return tokens_per_s * flops_per_token / peak
