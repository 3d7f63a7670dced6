"""The one entry the trainer imports from data_pipelines: build loaders, reshard their states.

``pretrain`` depends on this module and on nothing deeper in ``data_pipelines`` (a test reads the
imports to hold that). It dispatches on ``data.mode`` to the streaming loader (``stream.py``) or the
memmap loader of pretokenized shards (``pretokenized.py``); what both share sits beneath them
(``loader_common.py``), so neither loader imports the other.
"""

from __future__ import annotations

from typing import Any

from data_pipelines.loading.common import every_rank
from data_pipelines.loading.prefetch import Prefetcher
from data_pipelines.loading.pretokenized import PretokenizedLoader, reshard_pretokenized
from data_pipelines.loading.stream import (
    TrainLoader,
    build_stream_loader,
    build_val_loader,
    reshard_stream_states,
)
from data_pipelines.scrub.manifest import source_summary
from data_pipelines.tokenizer import load_tokenizer

__all__ = ["Prefetcher", "build_train_loader", "build_val_loader", "load_tokenizer", "reshard_states", "source_summaries"]


def build_train_loader(cfg: Any, dp_rank: int, dp_world: int, tokenizer=None) -> TrainLoader | PretokenizedLoader:
    """The training loader of data-parallel rank `dp_rank` of `dp_world`, for `data.mode`."""
    if cfg.data.mode == "pretokenized":
        return PretokenizedLoader(cfg, dp_rank, dp_world)
    return build_stream_loader(cfg, dp_rank, dp_world, tokenizer)


def reshard_states(states: list[dict], new_world: int, num_workers: int | None = None) -> list[dict]:
    """Loader states of every old rank -> states for each of `new_world` ranks (elastic resume)."""
    by_rank = every_rank(states)
    if by_rank[0]["mode"] == "pretokenized":
        return reshard_pretokenized(by_rank, new_world)
    return reshard_stream_states(by_rank, new_world, num_workers)


def source_summaries(cfg: Any) -> list[dict]:
    """Scrub manifest summary of every training and validation source, for run records."""
    return [source_summary(s.name, s.path) for s in list(cfg.data.sources) + list(cfg.data.validation)]
