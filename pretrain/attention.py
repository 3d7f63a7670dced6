"""Attention backends behind one function, and the masks they take.

Backends (``model.attention``):

- ``sdpa``: ``F.scaled_dot_product_attention`` (FlashAttention / memory-efficient kernels on GPU,
  the fused flash kernel on CPU). Document masking passes a block-diagonal causal bool mask.
- ``flash_attn``: the flash-attn package on CUDA (``flash_attn_func``; document masking through
  ``flash_attn_varlen_func`` with ``cu_seqlens``, so no [T x T] mask exists at all).
- ``flex``: FlexAttention with a block mask (CUDA only: torch has no FlexAttention backward on
  CPU, so a CPU training step cannot use it; ``auto`` never picks it there).
- ``eager``: the textbook softmax(QK^T / sqrt(d)) V in fp32, the reference the tests compare with.

``auto`` picks, per device / dtype / masking mode / length, the fastest backend available and
logs the choice once. Tensors enter as q [B, Tq, H, hd] and k, v [B, Tk, Hkv, hd] (grouped-query attention
when Hkv < H) and leave as [B, Tq, H, hd].
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from pretrain.errors import UserError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "sdpa", "flash_attn", "flex", "eager")


def flash_attn_available() -> bool:
    """flash-attn is importable and a CUDA device exists (its kernels are CUDA-only)."""
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def flex_available() -> bool:
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None and torch.cuda.is_available()


def check_backend(name: str) -> None:
    """Fail early, with the config key named, when an explicitly requested backend cannot run here."""
    if name not in BACKENDS:
        raise UserError(f"model.attention: unknown backend '{name}'; expected one of {', '.join(BACKENDS)}")
    if name == "flash_attn" and not flash_attn_available():
        why = "no CUDA device" if importlib.util.find_spec("flash_attn") else "the flash-attn package is not installed"
        raise UserError(
            f"model.attention=flash_attn but {why}; install it on a CUDA machine "
            "(pip install flash-attn, or the [gpu] extra) or use model.attention=auto"
        )
    if name == "flex" and not flex_available():
        raise UserError(
            "model.attention=flex needs CUDA: FlexAttention has no backward pass on CPU in this torch "
            f"({torch.__version__}); use model.attention=auto or sdpa"
        )


_logged: set[tuple] = set()


# On CPU, for bf16 sequences up to this length, two plain bf16 matmuls + an fp32 softmax (eager)
# beat the fused CPU flash kernel, whose backward is slow: measured ~1.06x per training step at
# the bench shape (T=256), while at T=512 and beyond SDPA wins.
CPU_EAGER_MAX_SEQ = 256


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype, doc_masking: bool,
                    seq_len: int | None = None) -> str:
    """The concrete backend for ``requested`` on this device, dtype, masking mode and length."""
    half = dtype in (torch.float16, torch.bfloat16)
    if requested != "auto":
        choice, why = requested, "requested"
        if choice == "flash_attn" and not half:
            raise UserError(
                f"model.attention=flash_attn needs bf16 or fp16 activations, got {str(dtype).removeprefix('torch.')}; "
                "set train.precision=bf16 or model.attention=auto"
            )
    elif device.type == "cuda" and flash_attn_available() and half:
        choice = "flash_attn"
        why = "flash-attn installed" + (" (varlen kernel for document masking)" if doc_masking else "")
    elif device.type == "cuda" and doc_masking and flex_available():
        choice, why = "flex", "CUDA with document masking and no flash-attn: block-sparse FlexAttention"
    elif device.type == "cpu" and half and seq_len is not None and seq_len <= CPU_EAGER_MAX_SEQ:
        choice, why = "eager", f"CPU, {str(dtype).removeprefix('torch.')}, sequence <= {CPU_EAGER_MAX_SEQ}: bf16 matmuls beat the CPU flash kernel"
    else:
        choice = "sdpa"
        why = "fused SDPA kernel" + (" with a block-diagonal causal mask" if doc_masking else "")
    key = (requested, device.type, dtype, doc_masking, choice)
    if key not in _logged:
        _logged.add(key)
        log.info("attention backend: %s (%s; device=%s, dtype=%s, doc_masking=%s)",
                 choice, why, device.type, str(dtype).removeprefix("torch."), doc_masking)
    return choice


# ------------------------------------------------------------------------------------------------
# Masks: built once per forward, shared by every layer.
# ------------------------------------------------------------------------------------------------


@dataclass
class AttnMask:
    """What the backend needs to mask: ``kind`` is one of

    - ``causal``: plain causal over one sequence (query i sees keys <= i);
    - ``none``: every query sees every key (one-token decode steps with a KV cache);
    - ``dense``: ``dense`` bool [B, 1, Tq, Tk], True = may attend;
    - ``varlen``: flash-attn ``cu_seqlens`` / ``max_seqlen`` over the flattened batch;
    - ``block``: a FlexAttention ``BlockMask``.
    """

    kind: str
    dense: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0
    block: Any = None


CAUSAL = AttnMask("causal")


def document_mask(backend: str, doc_ids: torch.Tensor) -> AttnMask:
    """Causal mask restricted to each document of a packed batch (doc_ids [B, T], 0,0,1,1,2,...)."""
    B, T = doc_ids.shape
    # Every row one document: the plain causal kernel is the fastest. Finding out reads the device,
    # so flex skips the test: its block mask is built on the device, a one-document row costs what
    # causal costs, and the host never waits (flash-attn's varlen lengths need the host anyway).
    if backend != "flex" and bool((doc_ids[:, 0] == doc_ids[:, -1]).all()):
        return CAUSAL
    if backend == "flash_attn":
        # A new sequence starts at each row start and at each document change.
        starts = torch.ones_like(doc_ids, dtype=torch.bool)
        starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        idx = torch.nonzero(starts.flatten(), as_tuple=False).flatten()
        cu = torch.cat([idx, idx.new_tensor([B * T])]).to(torch.int32)
        return AttnMask("varlen", cu_seqlens=cu, max_seqlen=int((cu[1:] - cu[:-1]).max()))
    if backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        def same_doc_causal(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

        # Compiled, the mask is built in one fused kernel instead of evaluating same_doc_causal
        # over every [T x T] position in eager ops on each step.
        block = create_block_mask(same_doc_causal, B, None, T, T, device=doc_ids.device, _compile=True)
        return AttnMask("block", block=block)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    return AttnMask("dense", dense=(same & causal)[:, None])


def offset_causal_mask(q_len: int, k_len: int, device: torch.device) -> AttnMask:
    """Causal mask for q_len new queries appended after k_len - q_len cached keys."""
    if q_len == 1:
        return AttnMask("none")
    if q_len == k_len:
        return CAUSAL
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    allowed = torch.arange(k_len, device=device)[None, :] <= q_pos
    return AttnMask("dense", dense=allowed[None, None])


# ------------------------------------------------------------------------------------------------
# The backends
# ------------------------------------------------------------------------------------------------


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str, mask: AttnMask) -> torch.Tensor:
    """Scaled dot-product attention with ``backend``; q [B,Tq,H,hd], k/v [B,Tk,Hkv,hd] -> [B,Tq,H,hd]."""
    if backend == "flash_attn":
        return _flash_attn(q, k, v, mask)
    if backend == "flex":
        return _flex(q, k, v, mask)
    if backend == "eager":
        return eager_attention(q, k, v, mask)
    return _sdpa(q, k, v, mask)


def _sdpa(q, k, v, mask: AttnMask) -> torch.Tensor:
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    gqa = q.shape[1] != k.shape[1]
    if mask.kind == "causal":
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    elif mask.kind == "none":
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    elif mask.kind == "dense":
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, enable_gqa=gqa)
    else:
        raise ValueError(f"sdpa cannot take a '{mask.kind}' mask")
    return out.transpose(1, 2)


def eager_attention(q, k, v, mask: AttnMask) -> torch.Tensor:
    """Textbook attention: explicit scores in the input dtype, softmax in fp32, -inf where masked.

    With fp32 inputs this is the exact reference the tests compare every backend against. With
    bf16 inputs it is also the fastest CPU path for short sequences (the [T x T] scores are small
    and two plain bf16 matmuls beat the fused CPU flash kernel's backward), see ``resolve_backend``.
    """
    B, Tq, H, hd = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    if Hkv != H:
        k = k.repeat_interleave(H // Hkv, dim=2)
        v = v.repeat_interleave(H // Hkv, dim=2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    scores = (q @ k.transpose(-1, -2)) * hd**-0.5
    if mask.kind == "causal":
        allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
        scores = scores.masked_fill(~allowed, float("-inf"))
    elif mask.kind == "dense":
        scores = scores.masked_fill(~mask.dense, float("-inf"))
    elif mask.kind != "none":
        raise ValueError(f"eager attention cannot take a '{mask.kind}' mask")
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    return (probs @ v).transpose(1, 2)


def _flash_attn(q, k, v, mask: AttnMask) -> torch.Tensor:
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    if mask.kind == "varlen":
        B, T, H, hd = q.shape
        out = flash_attn_varlen_func(
            q.reshape(B * T, H, hd), k.reshape(B * T, *k.shape[2:]), v.reshape(B * T, *v.shape[2:]),
            mask.cu_seqlens, mask.cu_seqlens, mask.max_seqlen, mask.max_seqlen, causal=True,
        )
        return out.view(B, T, H, hd)
    if mask.kind == "causal":
        return flash_attn_func(q, k, v, causal=True)
    if mask.kind == "none":
        return flash_attn_func(q, k, v, causal=False)
    return _sdpa(q, k, v, mask)  # offset masks of KV-cache prefill: not a training path


_compiled_flex = None


def _flex(q, k, v, mask: AttnMask) -> torch.Tensor:
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if mask.kind != "block":
        return _sdpa(q, k, v, mask)  # causal rows without packing: SDPA's causal kernel is as fast
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)  # flex is only fast (and only exists) compiled
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = _compiled_flex(q, k, v, block_mask=mask.block, enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2)
