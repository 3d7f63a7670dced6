"""``train.fp8=true``: refused cleanly where float8 tensor cores are missing; the layer filter."""

import subprocess
import sys

import pytest
import torch
from torch import nn

from pretrain.fp8 import MIN_DIM, wants_fp8

REPO = __import__("pathlib").Path(__file__).resolve().parents[3]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_fp8_on_cpu_exits_2_with_one_clear_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "pretrain", "train", str(REPO / "configs/bench/cpu_overhead.yaml"),
                        "train.fp8=true", f"run.dir={tmp_path / 'run'}"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "train.fp8=true needs a CUDA GPU with compute capability >= 8.9" in p.stderr
    assert "Traceback" not in p.stderr


def test_only_large_linear_layers_are_converted():
    big = nn.Linear(MIN_DIM, 4 * MIN_DIM, bias=False)
    assert wants_fp8(big, "layers.0.mlp.w_up")
    assert not wants_fp8(big, "lm_head")  # the fused loss reads its weight, not its forward
    assert not wants_fp8(nn.Linear(MIN_DIM // 2, 4 * MIN_DIM), "layers.0.attn.wq")  # casts cost more than they gain
    assert not wants_fp8(nn.Linear(MIN_DIM, MIN_DIM + 8), "layers.0.attn.wq")  # float8 GEMMs need multiples of 16
    assert not wants_fp8(nn.LayerNorm(MIN_DIM), "norm")
