"""`python -m pretrain.bench.overhead`: trainer step vs bare model step vs nanoGPT's, interleaved."""

import json
import os
import statistics
import subprocess
import sys

import pytest
from _trainer_helpers import (
    REPO,
    tiny_data_fixture,  # noqa: F401 - registers the tiny_data fixture
)


@pytest.mark.slow
def test_overhead_bench_times_three_steps_and_reports_ratios_of_its_own_medians(tiny_data, tmp_path):
    cfg = tmp_path / "o.yaml"
    cfg.write_text(f"""
extends: {REPO}/configs/bench/cpu_overhead.yaml
run: {{dir: {tmp_path / 'run'}}}
data:
  sources: [{{name: wiki, path: {tiny_data['corpus']}}}]
  tokenizer: {tiny_data['tokenizer']}
  require_scrubbed: false
bench: {{warmup_steps: 2, steps: 7}}
""")
    p = subprocess.run([sys.executable, "-m", "pretrain.bench.overhead", str(cfg)], cwd=REPO,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["shape"] == {"micro_batch_size": 1, "seq_len": 32, "d_model": 64, "n_layers": 2, "vocab_size": 4096}
    assert r["zero_stage"] == 1 and r["precision"] == "bf16" and r["bare_variant"] == "bf16_master"
    med = {}
    for name in ("trainer", "bare", "nanogpt"):
        times = r["times_s"][name]
        assert len(times) == 7 and all(t > 0 for t in times)
        med[name] = statistics.median(times)
        assert r[f"{name}_step_s_median"] == pytest.approx(med[name], abs=2e-6)
    assert r["trainer_over_bare"] == pytest.approx(med["trainer"] / med["bare"], abs=2e-3)
    assert r["bare_over_nanogpt"] == pytest.approx(med["bare"] / med["nanogpt"], abs=2e-3)
    assert r["bars"] == {"trainer_over_bare": 1.3, "bare_over_nanogpt": 1.15, "trainer_syncs_per_step": 0,
                         "ops_trainer_over_bare": 1.25}
    assert r["meets_bars"] == {k: r[k] <= r["bars"][k] for k in r["bars"]}
    # The deterministic counts (log_every=10: nine non-logging steps and one logging step).
    assert r["count_steps"] == 10
    assert r["trainer_syncs_per_step"] == 0, r["trainer_sync_ops"]  # the host never waits outside logging steps
    assert r["trainer_logging_step_syncs"] >= 1  # the logging step reads loss and counts: the counter sees it
    assert r["bare_ops_per_step"] > 100 and r["ops_trainer_over_bare"] <= 1.25
    assert r["ops_trainer_over_bare"] == pytest.approx(r["trainer_ops_per_step"] / r["bare_ops_per_step"], abs=1e-3)
