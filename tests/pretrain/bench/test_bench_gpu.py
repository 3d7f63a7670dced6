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

PARTS = ("test_gpu", "model_vs_nanogpt", "trainer_125m_nomask", "trainer_125m", "trainer_1b", "trainer_7b",
         "plan_125m", "plan_1b", "plan_7b")


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
    assert status == dict.fromkeys(PARTS, "ok")
    seconds = dict(line.split("=", 1) for line in (out / "seconds.txt").read_text().splitlines())
    assert set(seconds) == set(PARTS) and all(int(v) >= 0 for v in seconds.values())
    table = (out / "BENCH_GPU.md").read_text()
    assert table.strip() in p.stdout
    for row in ("model step nanogpt_autocast", "model step bf16_master", "trainer_125m_nomask", "trainer_125m",
                "trainer_1b", "trainer_7b"):
        line = next(x for x in table.splitlines() if x.startswith(f"| {row} "))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] != "-" and float(cells[1].replace(",", "")) > 0, line  # tokens/s from that part's JSON
        assert cells[-2] == "ok" and int(cells[-1]) >= 0, line  # status, then the part's seconds
    # nanoGPT has no document masking: the bar's row is the trainer without it, the other beside it.
    assert "trainer 125M without document masking / nanoGPT nanogpt_autocast" in table
    assert "trainer 125M with document masking / nanoGPT nanogpt_autocast" in table
    assert json.loads((out / "trainer_125m_nomask.json").read_text())["steps"] == 2  # its own bench ran
    for size in ("125m", "1b", "7b"):  # the planned peak beside the measured one comes from that config's plan
        line = next(x for x in table.splitlines() if x.startswith(f"| trainer_{size} "))
        planned = line.strip("|").split("|")[4].strip()
        plan = json.loads((out / f"plan_{size}.json").read_text())
        assert plan["plans"][0]["gpus"] == 1 and planned == f"{plan['plans'][0]['total_bytes'] / 2**30:.1f}", line


def test_bench_gpu_parts_share_one_budget_and_none_starts_without_time(tmp_path):
    """Every part runs for its cap or what is left of BENCH_GPU_BUDGET_S, never past it: with 5 s no
    part can start, each says so, the table still prints and the run exits 1."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "BENCH_GPU_DRY": "1", "BENCH_GPU_OUT": str(out),
           "BENCH_GPU_BUDGET_S": "5", "BENCH_GPU_DATA": "data.sources.0.path=unused"}
    p = subprocess.run(["bash", str(REPO / "launch/bench_gpu.sh")], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]
    status = dict(line.split("=", 1) for line in (out / "status.txt").read_text().splitlines())
    assert set(status) == set(PARTS)
    assert all(v.startswith("not run: ") and "of the 5s budget" in v for v in status.values()), status
    assert "not run" in (out / "BENCH_GPU.md").read_text()
