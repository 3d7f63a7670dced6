"""`make bench-gpu` (launch/bench_gpu.sh): its plumbing, on the CPU with BENCH_GPU_DRY=1."""

import json
import os
import subprocess
import sys

import pytest
from _trainer_helpers import (
    REPO,
    tiny_data_fixture,  # noqa: F401 - registers the tiny_data fixture
)


@pytest.mark.slow
def test_bench_gpu_dry_run_runs_every_part_and_prints_one_table(tiny_data, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "BENCH_GPU_DRY": "1",
           "BENCH_GPU_OUT": str(out),
           "BENCH_GPU_DATA": f"data.sources.0.path={tiny_data['corpus']} data.tokenizer={tiny_data['tokenizer']} "
                             "data.require_scrubbed=false"}
    p = subprocess.run(["bash", str(REPO / "launch/bench_gpu.sh")], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=1800)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    status = dict(line.split("=", 1) for line in (out / "status.txt").read_text().splitlines())
    parts = ("test_gpu", "model_vs_nanogpt", "trainer_125m", "trainer_1b", "trainer_7b", "plan_125m", "plan_1b", "plan_7b")
    assert status == dict.fromkeys(parts, "ok")
    table = (out / "BENCH_GPU.md").read_text()
    assert table.strip() in p.stdout
    for row in ("model step nanogpt_autocast", "model step bf16_master", "trainer_125m", "trainer_1b", "trainer_7b"):
        line = next(x for x in table.splitlines() if x.startswith(f"| {row} "))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] != "-" and float(cells[1].replace(",", "")) > 0, line  # tokens/s from that part's JSON
        assert cells[-1] == "ok", line
    assert "trainer 125M / nanoGPT nanogpt_autocast" in table
    for size in ("125m", "1b", "7b"):  # the planned peak beside the measured one comes from that config's plan
        line = next(x for x in table.splitlines() if x.startswith(f"| trainer_{size} "))
        planned = line.strip("|").split("|")[4].strip()
        plan = json.loads((out / f"plan_{size}.json").read_text())
        assert plan["plans"][0]["gpus"] == 1 and planned == f"{plan['plans'][0]['total_bytes'] / 2**30:.1f}", line
