from pathlib import Path

import pytest
import torch

from pretrain.config import ModelConfig, load_config
from pretrain.flops import (
    cpu_matmul_peak,
    flops_per_token,
    gpu_peak_flops,
    matmul_params,
    mfu,
    peak_flops_per_s,
)
from pretrain.model import Transformer

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "model"


def test_flops_per_token_bench_shape_by_hand():
    cfg = load_config(PRESETS / "cpu_small.yaml").model
    d, L, V, ffn = 384, 6, 8192, 1024
    n = L * (4 * d * d + 3 * d * ffn + 2 * d) + d + V * d
    assert matmul_params(cfg) == n == 13_767_552
    assert flops_per_token(cfg, 256) == 6 * n + 12 * L * 6 * 64 * 256


def test_matmul_params_is_non_embedding_params_plus_output_projection():
    # Untied, vocab already a multiple of 64: N = every parameter except the input embedding.
    cfg = load_config(PRESETS / "7b.yaml").model
    with torch.device("meta"):
        m = Transformer(cfg)
    assert matmul_params(cfg) == m.num_params(exclude_embedding=True)
    # Tied: the projection still costs its matmul, so N is unchanged by tying.
    tied = ModelConfig(**{**cfg.__dict__, "tie_embeddings": True})
    assert matmul_params(tied) == matmul_params(cfg)


def test_attention_term_grows_with_sequence():
    cfg = ModelConfig(vocab_size=1000, n_layers=2, n_heads=4, d_model=64)
    assert flops_per_token(cfg, 512) - flops_per_token(cfg, 256) == 12 * 2 * 4 * 16 * 256


@pytest.mark.parametrize(
    "name,peak",
    [
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA H100 80GB HBM3", 989.4e12),
        ("NVIDIA H100 PCIe", 756.5e12),
        ("NVIDIA H100 NVL", 835.5e12),
        ("NVIDIA H200", 989.4e12),
        ("NVIDIA B200", 2.25e15),
        ("Tesla V100-SXM2-16GB", None),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_gpu_peak_table(name, peak):
    assert gpu_peak_flops(name) == peak


def test_unknown_device_or_dtype_gives_no_peak():
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", "fp32") is None
    assert peak_flops_per_s("tpu") is None
    if not torch.cuda.is_available():
        assert peak_flops_per_s("cuda:0") is None
    assert mfu(1000.0, 1e9, None) is None


def test_mfu_arithmetic():
    assert mfu(1000.0, 6e8, 1.2e12) == pytest.approx(0.5)


def test_cpu_probe_is_positive_and_cached(monkeypatch):
    """Cached means the second call runs no probe matmul at all (no wall-clock bar: speed is a bench's job)."""
    import torch

    calls = []
    real = torch.matmul
    monkeypatch.setattr(torch, "matmul", lambda *a, **k: calls.append(1) or real(*a, **k))
    cpu_matmul_peak.cache_clear()
    peak = peak_flops_per_s("cpu", "bf16")
    assert peak is not None and 0 < peak < 1e15  # a rate, not a speed bar (shared machines are slow)
    probed = len(calls)
    assert probed >= 2  # a warm-up product and at least one timed one
    assert peak_flops_per_s("cpu", "bf16") == peak
    assert len(calls) == probed
