"""Fused and memory-lean building blocks: RMSNorm, SwiGLU, RoPE and a chunked cross-entropy.

Everything here is plain PyTorch written so ``torch.compile`` can fuse the element-wise chains
(norm, gate, rotation) into one kernel each; nothing depends on a GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


class RMSNorm(nn.Module):
    """Root-mean-square norm (no bias, no mean subtraction)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight. ATen's rms_norm keeps the statistics in fp32 for bf16/fp16 inputs (as
    Llama does), is one fused kernel on CPU and CUDA, and decomposes cleanly under torch.compile."""
    return F.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up: the SwiGLU activation (Shazeer 2020)."""
    return F.silu(gate) * up


# ------------------------------------------------------------------------------------------------
# Rotary position embeddings, Hugging Face Llama "rotate_half" (non-interleaved) convention: the
# first and second halves of each head form the (real, imaginary) pairs, so exported weights need
# no permutation.
# ------------------------------------------------------------------------------------------------


def rope_cache(max_seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [max_seq_len, head_dim] in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    t = torch.arange(max_seq_len, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, hd] by cos/sin broadcastable to [B, T, 1, hd] (already in x's dtype)."""
    return x * cos + rotate_half(x) * sin


# ------------------------------------------------------------------------------------------------
# Chunked (fused linear + cross-entropy) loss
# ------------------------------------------------------------------------------------------------


def _softmax_grad(logits: torch.Tensor, y: torch.Tensor, vocab_size: int):
    """(log p[y] [c, 1] in fp32, softmax - onehot [c, V] in logits' dtype) for one chunk.

    Tuned for eager mode: one fused log_softmax pass, softmax written straight in the compute
    dtype, and the target column (p - 1, where cancellation matters) computed in fp32 and
    scattered in. Mutates ``logits`` (the padding columns).
    """
    if logits.shape[1] > vocab_size:
        logits[:, vocab_size:] = float("-inf")
    logp = torch.log_softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    logp_y = logp.gather(1, y)
    g = torch.exp(logp, out=torch.empty(logp.shape, dtype=logits.dtype, device=logp.device))
    g.scatter_(1, y, (logp_y.exp() - 1).to(logits.dtype))
    return logp_y, g


def _softmax_grad_functional(logits: torch.Tensor, y: torch.Tensor, vocab_size: int):
    """The same as :func:`_softmax_grad`, written for torch.compile (inductor fuses it into one
    reduction and one element-wise loop: ~2x faster than the eager version on CPU)."""
    acc = torch.promote_types(logits.dtype, torch.float32)
    lf = logits.to(acc)
    cols = torch.arange(lf.shape[1], device=lf.device)
    if lf.shape[1] > vocab_size:
        lf = lf.masked_fill(cols >= vocab_size, float("-inf"))
    logp = torch.log_softmax(lf, dim=-1)
    return logp.gather(1, y), (logp.exp() - (cols == y).to(acc)).to(logits.dtype)


_compiled_softmax_grad = None


def _softmax_grad_compiled(logits, y, vocab_size):
    global _compiled_softmax_grad
    if _compiled_softmax_grad is None:
        _compiled_softmax_grad = torch.compile(_softmax_grad_functional, dynamic=False)
    return _compiled_softmax_grad(logits, y, vocab_size)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """mean CE of (hidden @ weight.T) without ever holding [tokens x vocab] fp32 logits.

    Forward walks the tokens in chunks: logits of one chunk, log-softmax in fp32, loss. When a
    gradient will be needed it computes that chunk's gradients right away (softmax - onehot, then
    the two matmuls), so backward only scales them by the incoming scalar gradient: no second
    logits matmul, and at most one chunk of logits alive at any time (the trick of Liger-Kernel's
    fused linear cross-entropy). Columns at and beyond ``vocab_size`` (the embedding's padding)
    are masked to -inf, so they never win and get zero gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, vocab_size: int, chunk_size: int, compute_dtype, compiled: bool):  # type: ignore[override]
        ctx.weight_dtype = weight.dtype
        w = weight.to(compute_dtype)
        h_all = hidden.to(compute_dtype)
        acc_dtype = torch.promote_types(compute_dtype, torch.float32)  # fp32, or fp64 in tests
        valid = labels != IGNORE_INDEX
        denom = valid.sum().clamp(min=1).to(acc_dtype)  # a tensor: no host sync in the forward pass
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(h_all) if want_h else None
        grad_weight = torch.zeros(w.shape, dtype=acc_dtype, device=w.device) if want_w else None
        total = torch.zeros((), dtype=acc_dtype, device=hidden.device)
        for start in range(0, h_all.shape[0], chunk_size):
            h = h_all[start : start + chunk_size]
            y = labels[start : start + chunk_size]
            ok = y != IGNORE_INDEX
            y_safe = torch.where(ok, y, 0)[:, None]
            logits = h @ w.t()
            if not (want_h or want_w):
                if logits.shape[1] > vocab_size:
                    logits[:, vocab_size:] = float("-inf")
                logp_y = torch.log_softmax(logits, dim=-1, dtype=acc_dtype).gather(1, y_safe)
                total -= torch.where(ok[:, None], logp_y, 0.0).sum()
                continue
            # d(mean CE)/d logits = (softmax - onehot) * scale, scale = 1/n_valid on valid rows
            # and 0 on ignored ones.
            logp_y, g = (_softmax_grad_compiled if compiled else _softmax_grad)(logits, y_safe, vocab_size)
            del logits
            total -= torch.where(ok[:, None], logp_y, 0.0).sum()
            # The row scale goes on the [chunk, d_model] side of each matmul, not on [chunk, vocab].
            scale = (ok.to(acc_dtype) / denom)[:, None]
            if want_h:
                grad_hidden[start : start + chunk_size] = ((g @ w).to(acc_dtype) * scale).to(compute_dtype)
            if want_w:
                grad_weight += (g.t() @ (h.to(acc_dtype) * scale).to(compute_dtype)).to(acc_dtype)
        ctx.hidden_dtype = hidden.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total / denom

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = gw = None
        if grad_hidden is not None:
            gh = (grad_hidden * grad_out.to(grad_hidden.dtype)).to(ctx.hidden_dtype)
        if grad_weight is not None:
            gw = (grad_weight * grad_out).to(ctx.weight_dtype)
        return gh, gw, None, None, None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int | None = None,
    chunk_size: int = 512,
    compiled: bool = False,
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``labels`` (ignore_index -100).

    hidden [N, D], weight [V_padded, D], labels [N]. Value and gradients equal
    ``F.cross_entropy(hidden @ weight[:vocab_size].T, labels)``; logits exist one chunk of
    ``chunk_size`` tokens at a time. ``chunk_size=0`` is the unfused reference path. Under
    autocast the matmuls run in the autocast dtype, as an autocast ``nn.Linear`` would.
    ``compiled`` runs the per-chunk softmax/gradient through torch.compile (model.compile).
    """
    vocab_size = weight.shape[0] if vocab_size is None else vocab_size
    if chunk_size <= 0:
        logits = (hidden @ weight[:vocab_size].t()).float()
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
    dev = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
    with torch.autocast(dev, enabled=False):
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, vocab_size, chunk_size, compute_dtype, compiled)
