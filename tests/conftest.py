"""Shared fixtures: the embedded demo corpus scrubbed and tokenized through the real commands.

Built once per test session (seconds) in a temporary directory; multi-process tests receive the
paths. Nothing here downloads anything.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Test helper modules (``_name.py``) shared by test files in subfolders: importable by name.
for helpers in ("pretrain", "pretrain/checkpoint", "data_pipelines/loading"):
    if str(REPO / "tests" / helpers) not in sys.path:
        sys.path.insert(0, str(REPO / "tests" / helpers))

# Tests never talk to wandb's servers and never wait on tokenizer thread pools after fork.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# DeepSpeed compiles its CPU communication op (deepspeed_shm_comm) on first use into the torch
# extensions cache. One cache per environment: checkouts with different venvs on one machine would
# otherwise rebuild each other's copy, each build waiting on the same lock for minutes.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


@pytest.fixture(scope="session")
def scrubbed_corpus(tmp_path_factory) -> Path:
    """A scrub output directory (shards + manifest.json + report) of the embedded Wikipedia sample."""
    from data_pipelines.scrub.runner import run_scrub
    from pretrain.config import load_config

    out = tmp_path_factory.mktemp("scrubbed")
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"scrub.output={out}", "scrub.workers=1"])
    assert run_scrub(cfg) in (0, None)
    assert (out / "manifest.json").is_file()
    return out


@pytest.fixture(scope="session")
def tokenizer_path(scrubbed_corpus, tmp_path_factory) -> Path:
    """tokenizer.json (byte-level BPE, 4096 tokens) trained on the scrubbed corpus."""
    from data_pipelines.tokenizer import train_tokenizer
    from pretrain.config import load_config

    out = tmp_path_factory.mktemp("tokenizer")
    cfg = load_config(
        REPO / "configs" / "demo.yaml",
        [f"tokenizer.input={scrubbed_corpus}", f"tokenizer.output={out}", "tokenizer.vocab_size=4096"],
    )
    assert train_tokenizer(cfg) in (0, None)
    path = out / "tokenizer.json"
    assert path.is_file()
    return path
