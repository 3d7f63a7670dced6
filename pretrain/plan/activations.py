"""Activation memory of one micro-batch, measured by running the real model on fake tensors.

``trace`` builds :class:`pretrain.model.Transformer` under ``FakeTensorMode`` (shapes, dtypes and
lifetimes, no data: a 7B model costs no memory and a forward/backward a few seconds on a CPU) and
runs one forward and backward with the config's activation checkpointing, while a dispatch mode
adds up the bytes of every tensor storage alive. Parameter gradients are freed as soon as they
arrive, as DeepSpeed does when it copies them into its buffers; the planner counts those buffers
separately (:mod:`pretrain.plan.states`).

For a GPU target the trace runs what the GPU would run, where the CPU differs:

- RMSNorm: CUDA's fused kernel keeps only its input and the inverse RMS for backward, where the
  CPU decomposition keeps two fp32 copies of the input; the trace routes ``F.rms_norm`` through
  the fused op's footprint (``aten._fused_rms_norm`` and its backward, which under fake tensors
  allocate exactly their outputs).
- Attention: PyTorch's flash kernel (which the CPU also has) keeps q, k, v, the output and the
  log-sum-exp, as flash-attn, FlexAttention and the CUDA SDPA kernels do; the document mask of
  those kernels (cu_seqlens or a block mask) is a few kilobytes and is not traced.
- The chunked loss uses the CUDA chunk size, and allocations round up to 512 bytes (the CUDA
  caching allocator's granularity, which ``torch.cuda.max_memory_allocated`` reports).

``model.compile`` is traced eagerly: inductor may keep fewer activations than the eager graph,
so for compiled models the activation figure is an upper bound (see the planner's docs page).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import weakref
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from pretrain.config import ModelConfig
from pretrain.model import LOSS_CHUNK_CPU, LOSS_CHUNK_CUDA, Transformer
from pretrain.ops import RMSNorm, chunked_cross_entropy

CUDA_ALLOCATION_GRANULARITY = 512


@dataclass(frozen=True)
class ActivationTrace:
    micro_batch: int
    peak: int  # most bytes alive at once in forward + backward, beyond parameters and model buffers
    loss_temp: int  # the chunked loss alone: its peak beyond its input (part of ``peak``)
    model_buffers: int  # non-parameter tensors the model holds (the RoPE tables)


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storages created under this mode and still alive, and their peak."""

    def __init__(self, granularity: int = 1):
        super().__init__()
        self.granularity = granularity
        self.live = self.peak = 0
        self._known: set[int] = set()

    def ignore(self, tensors) -> None:
        """Storages that existed before (parameters): views of them are not new memory."""
        for t in tensors:
            self._known.add(t.untyped_storage()._cdata)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t.untyped_storage())
        return out

    def _track(self, storage) -> None:
        key = storage._cdata
        if key in self._known:
            return
        g = self.granularity
        n = -(-storage.nbytes() // g) * g
        self._known.add(key)
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, n)

    def _free(self, key: int, n: int) -> None:
        self._known.discard(key)
        self.live -= n


class _FusedRMSNormFootprint(torch.autograd.Function):
    """F.rms_norm as CUDA runs it (one fused op saving input, weight and inverse RMS). Used only
    on fake tensors: the CPU build has no kernel for the fused backward."""

    @staticmethod
    def forward(ctx, x, normalized_shape, weight, eps):  # type: ignore[override]
        y, rstd = torch.ops.aten._fused_rms_norm(x, list(normalized_shape), weight, eps)
        ctx.normalized_shape = list(normalized_shape)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, weight, rstd = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[2]]
        dx, dw = torch.ops.aten._fused_rms_norm_backward(grad, x, ctx.normalized_shape, rstd, weight, mask)
        return dx, None, dw, None


def run_cuda_kernels(model: torch.nn.Module) -> None:
    """Make the traced model's RMSNorm layers keep what CUDA's fused kernel keeps (module doc).
    Per instance, on the trace's own fake model: a recomputation under activation
    checkpointing runs the same forward."""
    for m in model.modules():
        if isinstance(m, RMSNorm):
            m.forward = functools.partial(_fused_rms_norm, m)


def _fused_rms_norm(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    return _FusedRMSNormFootprint.apply(x, (x.shape[-1],), norm.weight.to(x.dtype), norm.eps)


def traced_model_config(model_cfg: ModelConfig, target: str) -> ModelConfig:
    """The model config the trace runs: eager (no torch.compile), and on a GPU target the
    attention kernel and loss chunk a GPU would use (see the module doc)."""
    chunk = model_cfg.loss_chunk_size
    if chunk is None:
        chunk = LOSS_CHUNK_CUDA if target == "cuda" else LOSS_CHUNK_CPU
    attention = model_cfg.attention
    if target == "cuda" and attention != "eager":
        attention = "sdpa"  # flash_attn / flex / CUDA SDPA keep what PyTorch's flash kernel keeps
    return dataclasses.replace(model_cfg, compile=False, attention=attention, loss_chunk_size=chunk)


def trace(model_cfg: ModelConfig, micro_batch: int, seq_len: int, param_dtype: torch.dtype,
          autocast_dtype: torch.dtype | None = None, target: str = "cuda") -> ActivationTrace:
    """Measure one forward/backward of ``micro_batch`` sequences of ``seq_len`` tokens on fake
    tensors (parameters in ``param_dtype``; ``autocast_dtype`` for autocast training)."""
    cfg = traced_model_config(model_cfg, target)
    granularity = CUDA_ALLOCATION_GRANULARITY if target == "cuda" else 1
    with FakeTensorMode(), _default_dtype(param_dtype):
        built = LiveBytes(granularity)
        with built:
            model = Transformer(cfg)
        if target == "cuda":
            run_cuda_kernels(model)
        params = list(model.parameters())
        model_buffers = built.live - sum(_rounded(p, granularity) for p in params)
        for p in params:  # DeepSpeed takes each gradient into its own buffers as it arrives
            p.register_post_accumulate_grad_hook(_drop_grad)
        ids = torch.randint(0, cfg.vocab_size, (micro_batch, seq_len))
        positions = torch.arange(seq_len).expand(micro_batch, seq_len) if cfg.reset_positions else None
        tracker = LiveBytes(granularity)
        tracker.ignore(params)
        tracker.ignore(_tensors_of(model))
        with tracker, _autocast(autocast_dtype):
            loss = model(input_ids=ids, labels=ids, position_ids=positions)
            loss.backward()
        del loss
        loss_temp = _loss_peak(cfg, micro_batch * seq_len, param_dtype, autocast_dtype, granularity)
    return ActivationTrace(micro_batch, tracker.peak, loss_temp, model_buffers)


def _loss_peak(cfg: ModelConfig, tokens: int, dtype, autocast_dtype, granularity: int) -> int:
    """Peak of the chunked loss (forward, which also computes its gradients) beyond its input."""
    hidden = torch.empty(tokens, cfg.d_model, dtype=dtype, requires_grad=True)
    weight = torch.empty(cfg.vocab_size + (-cfg.vocab_size) % cfg.vocab_multiple_of, cfg.d_model, dtype=dtype,
                         requires_grad=True)
    labels = torch.zeros(tokens, dtype=torch.long)
    tracker = LiveBytes(granularity)
    tracker.ignore([hidden, weight, labels])
    with tracker, _autocast(autocast_dtype):
        loss = chunked_cross_entropy(hidden, weight, labels, cfg.vocab_size, cfg.loss_chunk_size)
        loss.backward()
    return tracker.peak


def _drop_grad(p: torch.Tensor) -> None:
    p.grad = None


def _tensors_of(model: torch.nn.Module):
    """Non-parameter tensors a model holds as plain attributes (the RoPE tables) or buffers."""
    yield from model.buffers()
    for m in model.modules():
        for v in vars(m).values():
            if isinstance(v, torch.Tensor):
                yield v
            elif isinstance(v, tuple):
                yield from (x for x in v if isinstance(x, torch.Tensor))


def _rounded(t: torch.Tensor, granularity: int) -> int:
    return -(-t.untyped_storage().nbytes() // granularity) * granularity


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """Build parameters in ``dtype``, as DeepSpeed's cast of the module leaves them."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _autocast(dtype: torch.dtype | None):
    return torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()
