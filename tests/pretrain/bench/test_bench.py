"""`python -m pretrain bench`: the real step, timed; last stdout line is one JSON object."""

import json
import os
import subprocess
import sys

import pytest
from _trainer_helpers import (
    REPO,
    tiny_data_fixture,  # noqa: F401 - registers the tiny_data fixture
    write_config,
)


@pytest.mark.slow
def test_bench_prints_json_last_line_and_profile(tiny_data, tmp_path):
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_data, run)
    p = subprocess.run(
        [sys.executable, "-m", "pretrain", "bench", str(cfg), "bench.warmup_steps=1", "bench.steps=3",
         "bench.profile=true", "train.precision=bf16", "deepspeed.zero_stage=1"],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert p.returncode == 0, p.stderr[-4000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])
    for key in ("tokens_per_s", "mfu", "peak_flops", "step_time_s", "loader_wait_frac"):
        assert key in result, key
    assert result["steps"] == 3 and result["tokens_per_step"] == 4 * 64
    assert result["tokens_per_s"] == pytest.approx(result["tokens_per_step"] / result["step_time_s"], rel=1e-2)
    assert result["peak_flops"] > 0
    assert result["mfu"] == pytest.approx(
        result["tokens_per_s"] * result["flops_per_token"] / result["peak_flops"], rel=1e-2)
    assert 0 <= result["loader_wait_frac"] < 1
    assert set(result["phase_frac"]) == {"forward", "backward", "optimizer_step"}
    # The phases are timed inside each step: every one took time, together no more than the step.
    assert all(v > 0 for v in result["phase_frac"].values()) and sum(result["phase_frac"].values()) <= 1.01
    assert "aten::" in (run / "bench_profile.txt").read_text()
    assert not (run / "metrics.jsonl").exists()  # bench does not pose as a training run


def test_bench_model_times_each_variant_and_compares_with_nanogpt(capsys):
    """`python -m pretrain.bench.model`: one JSON line per variant, the summary last, on CPU."""
    from pretrain.bench.model import main

    assert main(["--config", str(REPO / "configs/model/tiny.yaml"), "--device", "cpu", "--batch", "2",
                 "--seq", "32", "--warmup", "1", "--steps", "3",
                 "--variants", "nanogpt_autocast,autocast[attention=eager]"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    rows, summary = lines[:-1], lines[-1]
    assert [r["variant"] for r in rows] == ["nanogpt_autocast", "autocast[attention=eager]"]
    for r in rows:
        assert r["tokens_per_s"] == pytest.approx(2 * 32 / r["step_time_s"], rel=1e-2)
        assert r["step_time_min_s"] <= r["step_time_s"]
        assert r["loss_first"] == pytest.approx(9.01, abs=0.3)  # ln(8192): an untrained model
    assert summary["device"] == "cpu" and summary["nanogpt_baseline"] == "nanogpt_autocast"
    base = rows[0]["tokens_per_s"]
    assert summary["speedup_vs_nanogpt"]["autocast[attention=eager]"] == round(rows[1]["tokens_per_s"] / base, 2)


def test_bench_model_rejects_unknown_variant_and_missing_cuda():
    from pretrain.bench.model import main

    with pytest.raises(SystemExit, match="unknown variant 'fast'"):
        main(["--variants", "fast"])
    if not __import__("torch").cuda.is_available():
        with pytest.raises(SystemExit) as e:
            main(["--device", "cuda"])
        assert e.value.code == 2
