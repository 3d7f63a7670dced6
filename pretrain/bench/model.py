"""Model-only training-step micro-benchmark: ``python -m pretrain.bench.model [options]``.

Times a full forward + backward + optimizer step at one shape (default: the CPU bench shape of
configs/model/cpu_small.yaml, sequence 256, micro-batch 8) on the CPU or a CUDA device
(``--device``), for several variants, each labelled by what it really does:

- ``nanogpt_autocast``: a faithful copy of nanoGPT's GPT (LayerNorm, GELU MLP, tied embeddings,
  full-logits cross-entropy) with fp32 weights under bf16 autocast and torch AdamW: the baseline.
- ``nanogpt_compile``: the same under ``torch.compile`` of the whole model (nanoGPT's GPU default).
- ``autocast``: our Transformer, fp32 weights, bf16 autocast, torch AdamW.
- ``fp32``: our Transformer in fp32, torch AdamW (what ``train.precision=fp32`` computes).
- ``bf16_master``: our Transformer with bf16 weights and fp32 master weights in the optimizer
  (grads copied to fp32, AdamW on the masters, masters copied back): what a DeepSpeed bf16 engine
  does, minus the engine.
- ``*_compile``: the same with ``model.compile=true`` (torch.compile per block).

Variants are timed interleaved, step by step, so a noisy neighbour hits them alike. Each variant
prints one JSON line; the last line is one JSON object with every result.
``--profile VARIANT`` also prints torch.profiler's top ops for that variant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.config import ModelConfig, load_config
from pretrain.flops import flops_per_token, peak_flops_per_s
from pretrain.model import Transformer

_REPO = Path(__file__).resolve().parents[2]
VARIANTS = ("nanogpt_autocast", "nanogpt_compile", "autocast", "bf16_master", "fp32", "autocast_compile",
            "bf16_master_compile", "fp32_compile")


# ------------------------------------------------------------------------------------------------
# nanoGPT's model (Karpathy, model.py, bias=False as train.py defaults), kept here as the baseline.
# ------------------------------------------------------------------------------------------------


class _NanoAttention(nn.Module):
    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.c_attn = nn.Linear(d, 3 * d, bias=False)
        self.c_proj = nn.Linear(d, d, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class _NanoBlock(nn.Module):
    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d, bias=False)
        self.attn = _NanoAttention(d, n_heads)
        self.ln_2 = nn.LayerNorm(d, bias=False)
        self.c_fc = nn.Linear(d, 4 * d, bias=False)
        self.c_proj = nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    def __init__(self, vocab: int, n_layers: int, n_heads: int, d: int, max_len: int):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(max_len, d)
        self.h = nn.ModuleList(_NanoBlock(d, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d, bias=False)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.wte.weight = self.lm_head.weight
        for name, p in self.named_parameters():
            std = 0.02 / math.sqrt(2 * n_layers) if name.endswith("c_proj.weight") else 0.02
            nn.init.normal_(p, 0.0, std) if p.dim() > 1 else None

    def forward(self, idx, labels):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1), ignore_index=-1)


# ------------------------------------------------------------------------------------------------
# Steps
# ------------------------------------------------------------------------------------------------


def _adamw(params, fused: bool) -> torch.optim.Optimizer:
    params = list(params)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), fused=fused or None)


class _MasterWeights:
    """fp32 master copy of bf16 model weights, as DeepSpeed's bf16 optimizer keeps them."""

    def __init__(self, model: nn.Module, fused: bool):
        self.model_params = [p for p in model.parameters() if p.requires_grad]
        self.master = [p.detach().float().clone().requires_grad_(True) for p in self.model_params]
        self.opt = _adamw(self.master, fused)

    def step(self) -> None:
        for m, p in zip(self.master, self.model_params, strict=True):
            m.grad = p.grad.float()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_copy_(self.model_params, self.master)
        for p in self.model_params:
            p.grad = None


def parse_variant(spec: str, cfg: ModelConfig) -> tuple[str, ModelConfig]:
    """'bf16_master[attention=eager;loss_chunk_size=512]' -> ('bf16_master', cfg with those keys)."""
    name, _, rest = spec.partition("[")
    if name not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    if not rest:
        return name, cfg
    overrides = [f"model.{kv}" for kv in rest.rstrip("]").split(";") if kv]
    merged = load_config(None, [f"model.{k}={v}" for k, v in dataclasses.asdict(cfg).items() if v is not None]
                         + overrides).model
    return name, merged


def build_step(spec: str, cfg: ModelConfig, fused_adamw: bool, device: str = "cpu"):
    """Return (step_fn(batch) -> loss, model) for a variant spec, with the model on ``device``."""
    variant, cfg = parse_variant(spec, cfg)
    kind = torch.device(device).type
    if variant.startswith("nanogpt"):
        model = NanoGPT(cfg.vocab_size, cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.max_seq_len).to(device)
        opt = _adamw(model.parameters(), fused=kind == "cuda")  # nanoGPT: fused AdamW on CUDA only
        if variant == "nanogpt_compile":  # nanoGPT's GPU default: torch.compile of the whole model
            model = torch.compile(model)

        def step(x, y):
            with torch.autocast(kind, dtype=torch.bfloat16):
                loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        return step, model

    compile_ = variant.endswith("_compile")
    model = Transformer(dataclasses.replace(cfg, compile=compile_)).to(device)
    if variant.startswith("bf16_master"):
        model = model.to(torch.bfloat16)
        master = _MasterWeights(model, fused_adamw)

        def step(x, y):
            loss = model(x, labels=y)
            loss.backward()
            master.step()
            return loss

        return step, model

    opt = _adamw(model.parameters(), fused_adamw)
    autocast = variant.startswith("autocast")

    def step(x, y):
        with torch.autocast(kind, dtype=torch.bfloat16, enabled=autocast):
            loss = model(x, labels=y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step, model


def _flops_per_token(spec: str, cfg: ModelConfig, seq: int) -> float:
    variant, cfg = parse_variant(spec, cfg)
    if variant.startswith("nanogpt"):  # its own shape: 4x GELU MLP, same attention and head
        d, L = cfg.d_model, cfg.n_layers
        return 6.0 * (L * 12 * d * d + cfg.vocab_size * d) + 12.0 * L * cfg.n_heads * (d // cfg.n_heads) * seq
    return flops_per_token(cfg, seq)


def run_variants(variants: list[str], cfg: ModelConfig, batch: int, seq: int, warmup: int, steps: int,
                 fused_adamw: bool, profile: str = "", device: str = "cpu") -> list[dict]:
    """Time ``steps`` steps of every variant, interleaved step by step (A B C A B C ...).

    On a shared machine a neighbour's burst then hits every variant alike, so the ratios stay
    meaningful even when the absolute numbers are noisy. Reports the median step time. On CUDA
    each timed step ends with a device synchronize, so the time is the kernels', not the launches'.
    """
    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=gen).to(device)
    inp, lab = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    steps_fns, warm_s = {}, {}
    for v in variants:
        torch.manual_seed(0)
        steps_fns[v], _ = build_step(v, cfg, fused_adamw, device)
        t0 = time.perf_counter()
        for _ in range(warmup):
            steps_fns[v](inp, lab)
        sync()
        warm_s[v] = time.perf_counter() - t0
    times: dict[str, list[float]] = {v: [] for v in variants}
    losses: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(steps):
        for v in variants:
            t0 = time.perf_counter()
            loss = steps_fns[v](inp, lab)
            sync()
            times[v].append(time.perf_counter() - t0)
            losses[v].append(float(loss.detach()))
    peak = peak_flops_per_s(device, "bf16")
    results = []
    for v in variants:
        step_s = sorted(times[v])[len(times[v]) // 2]
        tok_s = batch * seq / step_s
        fpt = _flops_per_token(v, cfg, seq)
        results.append({
            "variant": v, "tokens_per_s": round(tok_s, 1), "step_time_s": round(step_s, 4),
            "step_time_min_s": round(min(times[v]), 4), "mfu": round(tok_s * fpt / peak, 4) if peak else None,
            "flops_per_token": fpt, "peak_flops": peak, "warmup_s": round(warm_s[v], 2),
            "loss_first": round(losses[v][0], 4), "loss_last": round(losses[v][-1], 4),
        })
    if profile:
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(2):
                steps_fns[profile](inp, lab)
            sync()
        print(f"# profile of {profile} (2 steps)", file=sys.stderr)
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=25), file=sys.stderr)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.bench.model", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(_REPO / "configs" / "model" / "cpu_small.yaml"),
                   help="YAML with a model: section (default: the CPU bench shape)")
    p.add_argument("--variants", default="nanogpt_autocast,autocast,bf16_master",
                   help=f"comma-separated, from {', '.join(VARIANTS)}; a suffix like "
                   "[attention=eager;loss_chunk_size=512] sets model keys for one variant")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (CUDA when there is one)")
    p.add_argument("--no-fused-adamw", action="store_true", help="foreach AdamW instead of the fused kernel")
    p.add_argument("--profile", default="", help="variant to profile (top ops to stderr)")
    p.add_argument("overrides", nargs="*", help="model.* dotlist overrides, e.g. model.attention=eager")
    args = p.parse_args(argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {device}: no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides).model
    variants = args.variants.split(",")
    for v in variants + ([args.profile] if args.profile else []):
        parse_variant(v, load_config(args.config, args.overrides).model)
    if args.profile and args.profile not in variants:
        variants.append(args.profile)
    results = run_variants(variants, cfg, args.batch, args.seq, args.warmup, args.steps,
                           fused_adamw=not args.no_fused_adamw, profile=args.profile, device=device)
    for r in results:
        print(json.dumps(r), flush=True)
    # The baseline is nanoGPT's fastest form that was run: compiled when it was.
    by_name = {r["variant"]: r for r in results}
    base = by_name.get("nanogpt_compile") or by_name.get("nanogpt_autocast")
    summary = {"device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
               "threads": torch.get_num_threads(), "batch": args.batch, "seq": args.seq,
               "peak_flops": results[0]["peak_flops"],
               "tokens_per_s": {r["variant"]: r["tokens_per_s"] for r in results},
               "mfu": {r["variant"]: r["mfu"] for r in results}}
    if base:
        summary["nanogpt_baseline"] = base["variant"]
        summary["speedup_vs_nanogpt"] = {r["variant"]: round(r["tokens_per_s"] / base["tokens_per_s"], 2) for r in results}
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
