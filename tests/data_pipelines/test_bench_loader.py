"""`data_pipelines bench loader`: the last printed line is one JSON object with the figures."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from data_pipelines.bench_loader import bench_loader

sys.path.insert(0, str(Path(__file__).parent))
from _loader_fixtures import make_cfg, make_corpus  # noqa: E402


@pytest.mark.slow  # starts DataLoader worker processes
def test_bench_loader_reports_throughput_and_restore_cost(tmp_path, capsys):
    corpus = make_corpus(tmp_path)
    cfg = make_cfg(corpus, f"data.pretokenized_dir={tmp_path / 'pretok'}", mix=True)
    assert bench_loader(cfg, seconds=0.2, restore_far=200) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("streaming_tokens_per_s", "streaming_in_process_tokens_per_s", "pretokenized_tokens_per_s",
                "restore_s_at_10", "restore_s_at_far"):
        assert result[key] > 0, key
    assert result["restore_far_batches"] == 200 and result["seq_len"] == 16
    assert not (tmp_path / "pretok").exists()  # pretokenized into a temporary directory
