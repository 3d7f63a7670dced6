"""A decoder-only Transformer (Llama-style), readable top to bottom.

token embedding -> n_layers x [RMSNorm -> attention (RoPE, GQA) -> residual,
RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> output projection. No biases. The vocabulary is
padded up to ``vocab_multiple_of`` for fast matmuls; padding logits are never returned and never
win in the loss. Parallelism and precision live outside: this is a plain ``nn.Module`` that a
DeepSpeed engine (or anything else) wraps.

Parameter names follow the shared contract (``embed``, ``blocks.i.attn.wq``..., ``norm``,
``lm_head``) and RoPE uses Hugging Face Llama's rotate_half convention, so export to Llama format
is a renaming with no permutation.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from pretrain.attention import (
    CAUSAL,
    AttnMask,
    attention,
    check_backend,
    document_mask,
    offset_causal_mask,
    resolve_backend,
)
from pretrain.config import ModelConfig
from pretrain.ops import RMSNorm, apply_rope, chunked_cross_entropy, rope_cache, swiglu


def padded_vocab_size(cfg: ModelConfig) -> int:
    m = cfg.vocab_multiple_of
    return (cfg.vocab_size + m - 1) // m * m


def ffn_hidden_size(cfg: ModelConfig) -> int:
    """SwiGLU hidden size: given, or 8/3 d_model (same parameters as a 4x GELU MLP) rounded up."""
    if cfg.ffn_hidden is not None:
        return cfg.ffn_hidden
    m = cfg.ffn_multiple_of
    return (int(8 * cfg.d_model / 3) + m - 1) // m * m


def n_kv_heads(cfg: ModelConfig) -> int:
    return cfg.n_kv_heads if cfg.n_kv_heads is not None else cfg.n_heads


def param_count_formula(cfg: ModelConfig) -> int:
    """Closed-form parameter count (what the tests hold ``Transformer`` to)."""
    d, hd = cfg.d_model, cfg.d_model // cfg.n_heads
    v = padded_vocab_size(cfg)
    attn = d * d * 2 + 2 * d * n_kv_heads(cfg) * hd  # wq, wo + wk, wv
    mlp = 3 * d * ffn_hidden_size(cfg)
    per_block = attn + mlp + 2 * d  # two RMSNorm weights
    return v * d + cfg.n_layers * per_block + d + (0 if cfg.tie_embeddings else v * d)


class KVCache:
    """Keys and values of every layer for incremental decoding: [B, max_len, Hkv, hd] each."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype):
        hd = cfg.d_model // cfg.n_heads
        shape = (batch, max_len, n_kv_heads(cfg), hd)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.pos = 0  # tokens already cached
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.pos + k.shape[1]
        self.k[layer][:, self.pos : end] = k
        self.v[layer][:, self.pos : end] = v
        return self.k[layer][:, :end], self.v[layer][:, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads = cfg.n_heads, n_kv_heads(cfg)
        self.head_dim = cfg.d_model // cfg.n_heads
        self.wq = nn.Linear(cfg.d_model, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, backend: str, mask: AttnMask, cache: KVCache | None = None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        out = attention(q, k, v, backend, mask)
        return self.wo(out.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = ffn_hidden_size(cfg)
        self.w_gate = nn.Linear(cfg.d_model, hidden, bias=False)
        self.w_up = nn.Linear(cfg.d_model, hidden, bias=False)
        self.w_down = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x):
        return self.w_down(swiglu(self.w_gate(x), self.w_up(x)))


class LMHead(nn.Linear):
    """The output projection; with labels it returns the fused chunked loss instead of logits.

    Computing the loss inside this module's own forward matters under ZeRO-3, which gathers a
    partitioned weight only while its module runs.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.d_model, padded_vocab_size(cfg), bias=False)
        self.cfg = cfg

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return project_or_loss(h, self.weight, labels, self.cfg)


# model.loss_chunk_size=null: on an H200 (125M, 16 x 1024 tokens, `python -m pretrain.bench.model`)
# 4096-token chunks made the model step 1.41x faster than 512 (fewer, larger GEMMs and fewer fp32
# weight-gradient accumulations); on the CPU bench shape 512 is 1.06x faster than 2048.
LOSS_CHUNK_CUDA = 4096
LOSS_CHUNK_CPU = 512


def project_or_loss(h, weight, labels, cfg: ModelConfig) -> torch.Tensor:
    """Logits over the real vocabulary (padding excluded), or the mean loss when labels are given."""
    if labels is None:
        return F.linear(h, weight[: cfg.vocab_size])
    chunk = cfg.loss_chunk_size
    if chunk is None:
        chunk = LOSS_CHUNK_CUDA if h.is_cuda else LOSS_CHUNK_CPU
    return chunked_cross_entropy(h.reshape(-1, h.shape[-1]), weight, labels.reshape(-1), cfg.vocab_size,
                                 chunk, compiled=cfg.compile)


# model.activation_checkpointing=selective: inside each block keep the outputs of the matmuls and
# of the fused attention kernels, the expensive ops, and recompute everything else in backward
# (RMSNorm, RoPE, SwiGLU's activation and product, casts, residual adds: cheap elementwise work that
# still stores one or more [tokens x width] tensors per op). torchtitan's "selective op" policy.
# The eager attention reference is recomputed too: its [T x T] scores are what memory cannot hold.
def _existing_ops(namespace, *names: str) -> frozenset:
    """The ops of this torch build among ``names`` (overload ``default`` for aten ops)."""
    found = (getattr(namespace, n, None) for n in names)
    return frozenset(getattr(op, "default", op) for op in found if op is not None)


SELECTIVE_SAVE = _existing_ops(
    torch.ops.aten, "mm", "addmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
) | _existing_ops(torch.ops.higher_order, "flex_attention")


def _save_matmuls_and_attention(ctx, op, *args, **kwargs):
    policy = torch.utils.checkpoint.CheckpointPolicy
    return policy.MUST_SAVE if op in SELECTIVE_SAVE else policy.PREFER_RECOMPUTE


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, backend: str, mask: AttnMask, cache: KVCache | None = None):
        x = x + self.attn(self.attn_norm(x), cos, sin, backend, mask, cache)
        return x + self.mlp(self.mlp_norm(x))


def positions_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """0,1,2,0,1,0,... restarting wherever doc_ids changes along each row."""
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    start = torch.ones_like(doc_ids, dtype=torch.bool)
    start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    last_start = torch.where(start, idx, 0).cummax(dim=1).values
    return idx - last_start


def _whole(p: torch.Tensor):
    """The full tensor of ``p`` for the duration of the block: a parameter that
    ``deepspeed.zero.Init`` (ZeRO-3) has already partitioned is gathered one at a time, written on
    every rank from the same seed, and re-partitioned with rank 0's values; any other is itself."""
    if not hasattr(p, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([p], modifier_rank=0)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        check_backend(cfg.attention)
        self.cfg = cfg
        self.vocab_size = cfg.vocab_size
        self.padded_vocab = padded_vocab_size(cfg)
        self.embed = nn.Embedding(self.padded_vocab, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        # Tied: no lm_head module, the projection reuses embed.weight (checked to train identically
        # to ZeRO-1 under DeepSpeed ZeRO-3 with 2 ranks).
        self.lm_head = None if cfg.tie_embeddings else LMHead(cfg)
        # RoPE tables stay fp32 plain attributes (not buffers) so .to(bf16) by an engine cannot
        # degrade them; they follow the device lazily in _rope().
        self._rope_tables = rope_cache(cfg.max_seq_len, cfg.d_model // cfg.n_heads, cfg.rope_theta)
        self.reset_parameters()
        if cfg.compile:
            for block in self.blocks:
                block.compile()  # in place: parameter names (and checkpoints) stay unchanged

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) everywhere; the projections that write into the residual stream
        (wo, w_down) scaled by 1/sqrt(2 n_layers) so the stream's variance does not grow with depth
        (GPT-2)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            with _whole(p):
                if name.endswith("norm.weight"):
                    nn.init.ones_(p)
                elif name.endswith(("attn.wo.weight", "mlp.w_down.weight")):
                    nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layers))
                else:
                    nn.init.normal_(p, 0.0, std)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def _rope(self, device, dtype, position_ids: torch.Tensor | None, start: int, T: int):
        cos, sin = self._rope_tables
        if cos.device != device:
            self._rope_tables = cos, sin = cos.to(device), sin.to(device)
        if position_ids is None:
            if start + T > cos.shape[0]:
                raise ValueError(f"sequence of {start + T} tokens exceeds model.max_seq_len ({cos.shape[0]})")
            cos, sin = cos[start : start + T][None, :, None], sin[start : start + T][None, :, None]
        else:
            cos, sin = cos[position_ids][:, :, None], sin[position_ids][:, :, None]
        return cos.to(dtype), sin.to(dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """With labels: the mean loss over labels != -100. Without: logits [B, T, vocab_size].

        ``doc_ids`` [B, T] numbers the packed documents of each row; used when model.doc_masking.
        ``position_ids`` are used when model.reset_positions (derived from doc_ids if omitted);
        otherwise positions are 0..T-1. ``cache`` switches to incremental decoding.
        """
        cfg = self.cfg
        B, T = input_ids.shape
        h = self.embed(input_ids)
        dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
        backend = resolve_backend(cfg.attention, h.device, dtype, cfg.doc_masking, T)
        start = cache.pos if cache is not None else 0
        if cache is not None:
            mask = offset_causal_mask(T, start + T, h.device)
            position_ids = None
        elif cfg.doc_masking and doc_ids is not None:
            mask = document_mask(backend, doc_ids)
        else:
            mask = CAUSAL
        if not cfg.reset_positions:
            position_ids = None
        elif position_ids is None and doc_ids is not None and cache is None:
            position_ids = positions_from_doc_ids(doc_ids)
        cos, sin = self._rope(h.device, dtype, position_ids, start, T)

        for i, block in enumerate(self.blocks):
            if self.training and self._checkpointed(i):
                h = torch.utils.checkpoint.checkpoint(block, h, cos, sin, backend, mask, use_reentrant=False,
                                                      context_fn=self._checkpoint_context)
            else:
                h = block(h, cos, sin, backend, mask, cache)
        h = self.norm(h)
        if cache is not None:
            cache.pos += T

        if self.lm_head is not None:
            return self.lm_head(h, labels)
        return project_or_loss(h, self.embed.weight, labels, cfg)

    def _checkpointed(self, i: int) -> bool:
        mode = self.cfg.activation_checkpointing
        return mode in ("full", "selective") or (mode == "every_n" and i % self.cfg.checkpoint_every_n == 0)

    def _checkpoint_context(self):
        """What a checkpointed block keeps for backward: nothing but its inputs, or with
        ``selective`` also the outputs of :data:`SELECTIVE_SAVE` (see there)."""
        if self.cfg.activation_checkpointing != "selective":
            return torch.utils.checkpoint.noop_context_fn()
        return torch.utils.checkpoint.create_selective_checkpoint_contexts(_save_matmuls_and_attention)

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if exclude_embedding else n
