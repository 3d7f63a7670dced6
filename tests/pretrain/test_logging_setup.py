"""Rank-aware logging: rank 0 tells the story, other ranks only warn unless asked."""

from __future__ import annotations

import logging

import pytest

from pretrain.logging_setup import setup_logging


@pytest.mark.parametrize(
    "rank, all_ranks, level",
    [("0", False, logging.INFO), ("1", False, logging.WARNING), ("1", True, logging.INFO)],
)
def test_levels_by_rank(monkeypatch, rank, all_ranks, level):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.delenv("LOG_ALL_RANKS", raising=False)
    setup_logging("info", all_ranks=all_ranks)
    assert logging.getLogger().level == level


def test_env_switch_and_rank_tag(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOG_ALL_RANKS", "1")
    setup_logging("info")
    logging.getLogger("pretrain.x").info("hello")
    assert "rank 1" in capsys.readouterr().err
    # Idempotent: a second call does not add a second handler.
    setup_logging("info")
    ours = [h for h in logging.getLogger().handlers if getattr(h, "_pretrain", False)]
    assert len(ours) == 1
