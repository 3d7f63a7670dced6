"""Shared by test_trainer.py and test_bench.py: a tiny corpus + tokenizer, configs, launch helpers."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
TIMEOUT = 300


# --------------------------------------------------------------------------------------------
# Data and config helpers
# --------------------------------------------------------------------------------------------


def make_tiny_data(root: Path) -> dict:
    """A jsonl of the embedded Wikipedia sample and a 1024-token BPE trained on it (a few seconds)."""
    from data_pipelines.scrub.readers import read_enwiki
    from data_pipelines.tokenizer import train_tokenizer
    from pretrain.config import load_config

    corpus = root / "wiki.jsonl"
    with corpus.open("w") as f:
        for i, rec in enumerate(read_enwiki()):
            f.write(json.dumps({"id": str(i), "text": rec.text}) + "\n")
    cfg = load_config(None, [f"tokenizer.input={corpus}", f"tokenizer.output={root / 'tok'}",
                             "tokenizer.vocab_size=1024", "data.require_scrubbed=false"])
    train_tokenizer(cfg)
    return {"corpus": corpus, "tokenizer": root / "tok" / "tokenizer.json"}


@pytest.fixture(scope="module", name="tiny_data")
def tiny_data_fixture(tmp_path_factory) -> dict:
    """The `tiny_data` fixture of test_trainer.py and test_bench.py (they import it)."""
    return make_tiny_data(tmp_path_factory.mktemp("trainer_data"))


def write_config(path: Path, data: dict, run_dir: Path, extra: str = "") -> Path:
    path.write_text(f"""
extends: {REPO}/configs/model/tiny.yaml
run: {{name: t, dir: {run_dir}}}
data:
  sources: [{{name: wiki, path: {data['corpus']}}}]
  tokenizer: {data['tokenizer']}
  require_scrubbed: false
  seq_len: 64
  val_fraction: 0.05
model: {{vocab_size: 1024, max_seq_len: 64}}
train: {{micro_batch_size: 4, max_steps: 20, eval_every: 0, eval_batches: 2, log_every: 1, progress_bar: false}}
optim: {{lr: 3.0e-3, min_lr: 3.0e-4, warmup_steps: 2}}
checkpoint: {{every_steps: 0, save_on_exit: false}}
wandb: {{mode: disabled}}
{extra}
""")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun_script(script: Path, args: list[str], nproc: int = 2, timeout: int = TIMEOUT) -> None:
    """Run a test script under torchrun on 127.0.0.1 (one thread per rank, launcher variables
    cleared so DeepSpeed picks its accelerator by itself); fails the test on a non-zero exit."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "DS_ACCELERATOR")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(script), *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-4000:]


def command(config: Path, overrides: list[str], nproc: int) -> list[str]:
    if nproc == 1:
        return [PY, "-m", "pretrain", "train", str(config), *overrides]
    return [PY, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
            "-m", "pretrain", "train", str(config), *overrides]


def run_train(config: Path, overrides: list[str] = (), nproc: int = 2, env: dict | None = None,
              ok: bool = True) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    p = subprocess.run(command(config, list(overrides), nproc), cwd=REPO, env=full_env,
                       capture_output=True, text=True, timeout=TIMEOUT)
    if ok:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    return p


def metrics(run_dir: Path, kind: str) -> list[dict]:
    from pretrain.monitor import read_metrics

    return read_metrics(run_dir / "metrics.jsonl", kind)


def losses(run_dir: Path) -> list[float]:
    return [r["train/loss"] for r in metrics(run_dir, "train")]


def assert_loss_falls(run_dir: Path) -> None:
    ls = [x for x in losses(run_dir) if math.isfinite(x)]
    assert len(ls) >= 15, ls
    first, last = sum(ls[:3]) / 3, sum(ls[-3:]) / 3
    assert last < first - 0.3, f"loss did not fall: {first:.3f} -> {last:.3f}"
