"""`data_pipelines bench loader`: the last printed line is one JSON object with the figures."""

from __future__ import annotations

import json

import pytest
from _loader_fixtures import make_cfg, make_corpus

from data_pipelines.bench.loader import bench_loader


@pytest.mark.slow  # starts DataLoader worker processes
def test_bench_loader_reports_throughput_and_restore_cost(tmp_path, capsys):
    corpus = make_corpus(tmp_path)
    cfg = make_cfg(corpus, f"data.pretokenized_dir={tmp_path / 'pretok'}", mix=True)
    assert bench_loader(cfg, seconds=0.2, restore_far=200) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    tokens_per_batch = cfg.train.micro_batch_size * cfg.data.seq_len
    for key in ("streaming", "streaming_in_process", "pretokenized"):
        run = result[key]
        # every batch is full (micro_batch x seq_len input tokens), and the rate is what was counted
        assert run["batches"] > 0 and run["tokens"] == run["batches"] * tokens_per_batch, key
        assert run["tokens_per_s"] == round(run["tokens"] / run["seconds"]), key
        assert result[f"{key}_tokens_per_s"] == run["tokens_per_s"], key
    # the bench itself checks that each restored loader continues with the very next batch
    assert 0 < result["restore_s_at_10"] and 0 < result["restore_s_at_far"]
    assert result["restore_far_batches"] == 200 and result["seq_len"] == 16
    assert not (tmp_path / "pretok").exists()  # pretokenized into a temporary directory
