"""The one entry the trainer imports from data_pipelines: build loaders, reshard their states.

``pretrain`` depends on this module and on nothing deeper in ``data_pipelines`` (a test reads the
imports to hold that). It dispatches on ``data.mode`` to the streaming loader (``stream.py``) or the
memmap loader of pretokenized shards (``pretokenized.py``); what both share sits beneath them.
"""

from __future__ import annotations

from typing import Any

from data_pipelines.manifest import source_summary
from data_pipelines.prefetch import Prefetcher
from data_pipelines.stream import build_train_loader, build_val_loader, reshard_states
from data_pipelines.tokenizer import load_tokenizer

__all__ = ["Prefetcher", "build_train_loader", "build_val_loader", "load_tokenizer", "reshard_states", "source_summaries"]


def source_summaries(cfg: Any) -> list[dict]:
    """Scrub manifest summary of every training and validation source, for run records."""
    return [source_summary(s.name, s.path) for s in list(cfg.data.sources) + list(cfg.data.validation)]
