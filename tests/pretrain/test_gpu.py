"""The CUDA paths: attention backends against the fp32 reference, the model, MFU, the trainer.

Skipped where there is no CUDA device (the CPU CI); on a GPU machine run
``pytest -m gpu tests/pretrain/test_gpu.py``. Each test compares a GPU path with the same
reference the CPU tests use, so a wrong mask, a wrong kernel choice or a broken engine fails here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.attention import (
    CAUSAL,
    attention,
    document_mask,
    eager_attention,
    flash_attn_available,
    flex_available,
    resolve_backend,
)
from pretrain.config import load_config
from pretrain.model import Transformer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

REPO = Path(__file__).resolve().parents[2]
CUDA = torch.device("cuda")


def _gpu_backends() -> list[str]:
    return ["sdpa"] + (["flex"] if flex_available() else []) + (["flash_attn"] if flash_attn_available() else [])


def _doc_ids(B: int, T: int, seed: int) -> torch.Tensor:
    """Rows of packed documents of random lengths (some rows a single document)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(B):
        cuts = sorted(torch.randperm(T - 1, generator=g)[: 3 * b].add(1).tolist())
        ids = torch.zeros(T, dtype=torch.long)
        for c in cuts:
            ids[c:] += 1
        rows.append(ids)
    return torch.stack(rows).to(CUDA)


@pytest.mark.parametrize("T", [256, 200])  # 200: not a multiple of the kernels' block sizes
@pytest.mark.parametrize("doc_masking", [False, True])
@pytest.mark.parametrize("backend", ["sdpa", "flex", "flash_attn"])
def test_backend_matches_fp32_reference_forward_and_backward(backend, doc_masking, T):
    if backend not in _gpu_backends():
        pytest.skip(f"{backend} is not available on this machine")
    B, H, Hkv, hd = 3, 8, 2, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, T, h, hd, device=CUDA, generator=g) for h in (H, Hkv, Hkv))
    doc_ids = _doc_ids(B, T, seed=1)
    ref_mask = document_mask("eager", doc_ids) if doc_masking else CAUSAL
    mask = document_mask(backend, doc_ids) if doc_masking else CAUSAL
    if doc_masking:
        assert mask.kind == {"sdpa": "dense", "flex": "block", "flash_attn": "varlen"}[backend]

    leaves = [t.to(torch.bfloat16).requires_grad_(True) for t in (q, k, v)]
    out = attention(*leaves, backend, mask)
    ref_leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = eager_attention(*ref_leaves, ref_mask)
    grad_out = torch.randn(ref.shape, device=CUDA, generator=g)
    out.backward(grad_out.to(out.dtype))
    ref.backward(grad_out)

    assert out.shape == ref.shape == (B, T, H, hd)
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    for name, a, b in zip("qkv", leaves, ref_leaves, strict=True):
        err = (a.grad.float() - b.grad).norm() / b.grad.norm()
        assert err < 2e-2, f"d{name}: relative error {err:.3g} against the fp32 reference"


def test_auto_picks_the_fastest_available_cuda_backend():
    want_doc = "flash_attn" if flash_attn_available() else ("flex" if flex_available() else "sdpa")
    want_plain = "flash_attn" if flash_attn_available() else "sdpa"
    assert resolve_backend("auto", CUDA, torch.bfloat16, doc_masking=True, seq_len=2048) == want_doc
    assert resolve_backend("auto", CUDA, torch.bfloat16, doc_masking=False, seq_len=2048) == want_plain


def _tiny_model_cfg(**kw):
    over = [f"model.{k}={v}" for k, v in {"vocab_size": 512, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                          "d_model": 128, "max_seq_len": 256, **kw}.items()]
    return load_config(None, over).model


def test_model_with_doc_masking_matches_eager_on_cuda():
    """The whole model, auto backend in bf16 vs the eager backend in fp32, packed documents."""
    torch.manual_seed(0)
    ref = Transformer(_tiny_model_cfg(attention="eager", doc_masking="true", reset_positions="true")).to(CUDA)
    fast = Transformer(_tiny_model_cfg(attention="auto", doc_masking="true", reset_positions="true")).to(CUDA)
    fast.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 512, (2, 256), device=CUDA)
    doc_ids = _doc_ids(2, 256, seed=3)
    with torch.no_grad():
        want = ref(idx, doc_ids=doc_ids)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = fast(idx, doc_ids=doc_ids)
    err = (got.float() - want).norm() / want.norm()
    assert err < 3e-2, f"logits relative error {err:.3g}"


def test_loss_chunk_default_on_cuda(monkeypatch):
    import pretrain.model as model_mod

    seen = []
    real = model_mod.chunked_cross_entropy
    monkeypatch.setattr(model_mod, "chunked_cross_entropy", lambda *a, **k: seen.append(a[4]) or real(*a, **k))
    model = Transformer(_tiny_model_cfg()).to(CUDA)
    idx = torch.randint(0, 512, (2, 65), device=CUDA)
    model(idx[:, :-1], labels=idx[:, 1:])
    assert seen == [model_mod.LOSS_CHUNK_CUDA] == [4096]


def test_compiled_bf16_model_trains_on_cuda():
    """model.compile=true, bf16 weights, fused AdamW: same logits as uncompiled, and it learns."""
    torch.manual_seed(0)
    model = Transformer(_tiny_model_cfg(compile="true")).to(CUDA, torch.bfloat16)
    plain = Transformer(_tiny_model_cfg()).to(CUDA, torch.bfloat16)
    plain.load_state_dict(model.state_dict())
    idx = torch.randint(0, 512, (4, 129), device=CUDA)
    with torch.no_grad():
        torch.testing.assert_close(model(idx[:, :-1]).float(), plain(idx[:, :-1]).float(), atol=5e-2, rtol=5e-2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
    losses = []
    for _ in range(30):
        loss = model(idx[:, :-1], labels=idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_peak_flops_known_for_datacenter_gpus():
    from pretrain.flops import peak_flops_per_s

    name = torch.cuda.get_device_name()
    peak = peak_flops_per_s("cuda", "bf16")
    if any(k in name.upper() for k in ("A100", "H100", "H200", "B200")):
        assert peak is not None and 3e14 < peak < 3e15, (name, peak)
    assert peak_flops_per_s("cuda", "fp32") is None  # no MFU rather than a wrong one


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")
def test_trainer_on_one_gpu_nccl_bf16_checkpoint_and_resume(tmp_path):
    """`python -m pretrain train` on CUDA: NCCL, bf16 ZeRO-2, doc masking, MFU, save and resume."""
    from data_pipelines.tokenizer import train_tokenizer

    words = ("the model reads packed documents and learns which token follows which one in every "
             "sentence of this small corpus while the checkpoint keeps its place").split()
    g = torch.Generator().manual_seed(0)
    corpus = tmp_path / "corpus.jsonl"
    with corpus.open("w") as f:
        for i in range(400):
            n = int(torch.randint(20, 120, (1,), generator=g))
            text = " ".join(words[int(j)] for j in torch.randint(0, len(words), (n,), generator=g))
            f.write(json.dumps({"id": str(i), "text": text}) + "\n")
    train_tokenizer(load_config(None, [f"tokenizer.input={corpus}", f"tokenizer.output={tmp_path / 'tok'}",
                                       "tokenizer.vocab_size=512", "data.require_scrubbed=false"]))
    run = tmp_path / "run"
    config = tmp_path / "gpu.yaml"
    config.write_text(f"""
run: {{name: gpu, dir: {run}}}
data:
  sources: [{{name: c, path: {corpus}}}]
  tokenizer: {tmp_path / 'tok' / 'tokenizer.json'}
  require_scrubbed: false
  seq_len: 256
model: {{vocab_size: 512, n_layers: 2, n_heads: 4, d_model: 128, max_seq_len: 256, doc_masking: true}}
train: {{micro_batch_size: 8, precision: bf16, log_every: 1, eval_every: 0, progress_bar: false}}
optim: {{lr: 3.0e-3, warmup_steps: 2}}
deepspeed: {{zero_stage: 2}}
checkpoint: {{every_steps: 15}}
wandb: {{mode: disabled}}
""")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}

    def train(max_steps: int) -> subprocess.CompletedProcess:
        p = subprocess.run([sys.executable, "-m", "pretrain", "train", str(config), f"train.max_steps={max_steps}"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
        return p

    train(30)
    from pretrain.monitor import read_metrics

    rows = read_metrics(run / "metrics.jsonl", "train")
    assert rows[-1]["train/loss"] < rows[0]["train/loss"] - 1.0
    assert rows[-1]["perf/mfu"] is None or 0 < rows[-1]["perf/mfu"] < 1
    assert rows[-1]["perf/memory_bytes"] > 0
    second = train(40)
    assert "step_00000030" in second.stderr  # resumed from the last save, not from scratch
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl", "train")]
    assert steps[-10:] == list(range(31, 41))
    setup = read_metrics(run / "metrics.jsonl", "setup")[0]
    assert setup["setup/device"] == torch.cuda.get_device_name() and setup["setup/backend"] == "nccl", setup


FP8_STEPS, FP8_TOLERANCE = 50, 0.05  # loss after 50 steps within 5% of bf16's (same init, same batches)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9)
                    or importlib.util.find_spec("torchao") is None, reason="needs float8 tensor cores and torchao")
def test_fp8_loss_tracks_bf16():
    from pretrain.fp8 import convert_to_fp8

    cfg = load_config(None, ["model.n_layers=2", "model.d_model=1024", "model.n_heads=8", "model.vocab_size=4096",
                             "model.max_seq_len=256"]).model
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, 64, (FP8_STEPS, 8, 257), generator=gen).cuda()  # a small alphabet: learnable
    final = {}
    for fp8 in (False, True):
        torch.manual_seed(0)
        model = Transformer(cfg).cuda().to(torch.bfloat16)
        if fp8:
            assert convert_to_fp8(model) > 0
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        for x in data:
            loss = model(x[:, :-1], labels=x[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        final[fp8] = loss.item()
    assert final[False] < 4.0  # it learned (ln 4096 = 8.3)
    assert abs(final[True] - final[False]) <= FP8_TOLERANCE * final[False], final
