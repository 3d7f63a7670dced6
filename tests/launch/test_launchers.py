"""Multi-node launch on one machine: torchrun as two nodes, the deepspeed launcher, and the
SLURM script's launch logic (with a local stand-in for srun), all on 127.0.0.1 with gloo.

The proof that a launcher is right: it trains the same losses as a plain single-node run of the
same config (fp32, same global batch, same data-parallel layout).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    out = {r["step"]: r["train/loss"] for r in rows if r.get("kind") == "train"}
    assert out, f"no training losses in {run_dir / 'metrics.jsonl'}"
    return out


@pytest.fixture(scope="module")
def train_args(scrubbed_corpus, tokenizer_path):
    def make(run_dir: Path, steps: int = 10, *extra: str) -> list[str]:
        return [
            str(REPO / "configs" / "demo.yaml"),
            f"run.dir={run_dir}",
            f"data.sources=[{{name: enwiki, path: {scrubbed_corpus}}}]",
            f"data.tokenizer={tokenizer_path}",
            "data.seq_len=64", "model.max_seq_len=64", "model.n_layers=2", "model.d_model=64",
            "model.n_heads=4", "train.micro_batch_size=4", f"train.max_steps={steps}",
            "train.max_time_s=null", "train.eval_every=0", "train.log_every=1", "train.precision=fp32",
            "train.progress_bar=false", "optim.warmup_steps=2", "deepspeed.zero_stage=2",
            "checkpoint.every_steps=0", "wandb.mode=disabled", *extra,
        ]

    return make


def env(**extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    e.update(OMP_NUM_THREADS="1", PYTHON=sys.executable, **extra)
    return e


def run(cmd: list[str], timeout: int = 300, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert p.returncode == 0, f"{cmd[:2]} exited {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p


@pytest.fixture(scope="module")
def reference(tmp_path_factory, train_args) -> dict[int, float]:
    """One node, two processes: the losses every other launcher must reproduce."""
    run_dir = tmp_path_factory.mktemp("ref")
    run(["bash", str(LAUNCH / "torchrun.sh"), *train_args(run_dir)],
        env=env(NPROC_PER_NODE="2", MASTER_PORT=str(free_port())))
    got = losses(run_dir)
    assert sorted(got) == list(range(1, 11))
    return got


def test_torchrun_two_nodes_on_localhost(tmp_path, train_args, reference):
    port = str(free_port())
    procs = [
        subprocess.Popen(["bash", str(LAUNCH / "torchrun.sh"), *train_args(tmp_path)],
                         env=env(NNODES="2", NODE_RANK=str(node), NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1",
                                 MASTER_PORT=port),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for node in (0, 1)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    assert losses(tmp_path) == pytest.approx(reference, rel=1e-5)


def test_deepspeed_launcher_with_localhost_hostfile(tmp_path, train_args, reference):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    run(["bash", str(LAUNCH / "deepspeed.sh"), *train_args(tmp_path / "run")],
        env=env(HOSTFILE=str(hostfile), MASTER_PORT=str(free_port())))
    assert losses(tmp_path / "run") == pytest.approx(reference, rel=1e-5)


FAKE_SRUN = r"""#!/usr/bin/env bash
# Stand-in for srun on one machine: run the task once per node of the job, in parallel, with the
# variables srun sets per task. Options other than --nodes are accepted and ignored.
nodes=${SLURM_JOB_NUM_NODES:-1}
while [[ $# -gt 0 && $1 == -* ]]; do
  case $1 in --nodes=*) nodes=${1#--nodes=} ;; esac
  shift
done
pids=()
for ((n = 0; n < nodes; n++)); do
  SLURM_NODEID=$n SLURM_PROCID=$n SLURM_LOCALID=0 "$@" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""


def slurm_env(tmp_path: Path) -> dict[str, str]:
    srun = tmp_path / "srun"
    srun.write_text(FAKE_SRUN)
    srun.chmod(0o755)
    return env(SRUN=str(srun), SLURM_JOB_ID="4242", SLURM_JOB_NAME="pretrain-test", SLURM_JOB_NUM_NODES="2",
               SLURM_NNODES="2", SLURM_JOB_NODELIST="127.0.0.1", SLURM_SUBMIT_DIR=str(REPO),
               HEAD_NODE="127.0.0.1", NPROC_PER_NODE="1", RDZV_PORT=str(free_port()),
               LOG_ROOT=str(tmp_path / "logs"))


def test_slurm_script_two_nodes(tmp_path, train_args, reference):
    run(["bash", str(LAUNCH / "slurm.sbatch"), *train_args(tmp_path / "run")], env=slurm_env(tmp_path), cwd=REPO)
    assert losses(tmp_path / "run") == pytest.approx(reference, rel=1e-5)
    assert (tmp_path / "logs" / "pretrain-test-4242" / "node0.log").is_file()  # per-job log directory


def test_slurm_preemption_saves_and_requeued_job_resumes(tmp_path, train_args):
    """SIGUSR1 to the batch script (SLURM's warning before the time limit): the trainers finish
    their step, save and exit 0; the requeued job continues from that checkpoint, with the losses
    an uninterrupted run has at those steps (constant LR, so the schedule does not depend on
    max_steps)."""
    run_dir = tmp_path / "run"
    args = train_args(run_dir, 10_000, "optim.schedule=constant")
    p = subprocess.Popen(["bash", str(LAUNCH / "slurm.sbatch"), *args], env=slurm_env(tmp_path), cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if (run_dir / "metrics.jsonl").is_file() and len(losses_or_empty(run_dir)) >= 3:
            break
        time.sleep(0.5)
    assert p.poll() is None, p.communicate()[0][-4000:]
    p.send_signal(signal.SIGUSR1)
    out = p.communicate(timeout=240)[0]
    assert p.returncode == 0, out[-4000:]
    before = losses(run_dir)
    stopped_at = max(before)
    assert sorted(before) == list(range(1, stopped_at + 1))
    saved = run_dir / "checkpoints" / f"step_{stopped_at:08d}"
    assert (saved / "COMPLETE.json").is_file(), f"no complete checkpoint of step {stopped_at}: {out[-3000:]}"

    # The requeued job: same command, resumes automatically, trains 2 more steps.
    run(["bash", str(LAUNCH / "slurm.sbatch"), *train_args(run_dir, stopped_at + 2, "optim.schedule=constant")],
        env=slurm_env(tmp_path), cwd=REPO)
    node0 = (tmp_path / "logs" / "pretrain-test-4242" / "node0.log").read_text()  # the requeued job's log
    assert f"resumed at step {stopped_at}" in node0, node0[-3000:]
    trained = [int(line.split("step ", 1)[1].split(" ")[0]) for line in node0.splitlines() if " | loss " in line]
    assert trained == [stopped_at + 1, stopped_at + 2], f"the requeued job trained steps {trained}"
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r["step"] for r in rows if r.get("kind") == "train"]
    assert steps == list(range(1, stopped_at + 3)), f"a step was trained twice or lost after the requeue: {steps}"
    after = losses(run_dir)
    assert {k: after[k] for k in before} == before  # the first job's rows are kept, not rewritten

    # An uninterrupted run of the same config (same 2-rank layout) has the same losses there.
    ref_dir = tmp_path / "uninterrupted"
    run(["bash", str(LAUNCH / "torchrun.sh"), *train_args(ref_dir, stopped_at + 2, "optim.schedule=constant")],
        env=env(NPROC_PER_NODE="2", MASTER_PORT=str(free_port())))
    ref = losses(ref_dir)
    assert [after[s] for s in (stopped_at + 1, stopped_at + 2)] == pytest.approx(
        [ref[s] for s in (stopped_at + 1, stopped_at + 2)], rel=1e-5)


def losses_or_empty(run_dir: Path) -> dict[int, float]:
    try:
        return losses(run_dir)
    except (AssertionError, json.JSONDecodeError, KeyError):
        return {}
