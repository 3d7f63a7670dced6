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

import psutil
import pytest

from pretrain.faults import FAULT_ENV

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
# variables srun sets per task, and record each task's pid in $FAKE_SLURM_STATE/<job id>.tasks (the
# processes of this job's steps, for the scancel stand-in). Options other than --nodes are ignored.
nodes=${SLURM_JOB_NUM_NODES:-1}
while [[ $# -gt 0 && $1 == -* ]]; do
  case $1 in --nodes=*) nodes=${1#--nodes=} ;; esac
  shift
done
pids=()
for ((n = 0; n < nodes; n++)); do
  SLURM_NODEID=$n SLURM_PROCID=$n SLURM_LOCALID=0 "$@" &
  pids+=($!)
  echo $! >> "$FAKE_SLURM_STATE/$SLURM_JOB_ID.tasks"
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""

FAKE_SCANCEL = r"""
# Stand-in for `scancel --signal=SIG JOBID`: like slurmstepd, signal every process of the job's
# steps (the tasks srun started and all their descendants: its cgroup), never the batch script,
# and nothing of any other job.
import os
import signal
import sys

import psutil

sig = getattr(signal, "SIG" + next(a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--signal=")))
for line in open(os.path.join(os.environ["FAKE_SLURM_STATE"], f"{sys.argv[-1]}.tasks")):
    try:
        task = psutil.Process(int(line))
        procs = [task, *task.children(recursive=True)]
    except psutil.NoSuchProcess:
        continue
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
"""


FAKE_SCONTROL = """#!/usr/bin/env bash
# Stand-in for scontrol: records what it was asked (requeue JOBID) in $FAKE_SLURM_STATE/scontrol.log.
echo "$@" >> "$FAKE_SLURM_STATE/scontrol.log"
"""


def slurm_env(tmp_path: Path) -> dict[str, str]:
    tools = {"srun": FAKE_SRUN, "scancel": f"#!{sys.executable}\n{FAKE_SCANCEL}", "scontrol": FAKE_SCONTROL}
    for name, text in tools.items():
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o755)
    state = tmp_path / "slurm_state"
    state.mkdir(exist_ok=True)
    return env(SRUN=str(tmp_path / "srun"), SCANCEL=str(tmp_path / "scancel"), SCONTROL=str(tmp_path / "scontrol"),
               FAKE_SLURM_STATE=str(state), SLURM_JOB_ID="4242", SLURM_JOB_NAME="pretrain-test", SLURM_JOB_NUM_NODES="2",
               SLURM_NNODES="2", SLURM_JOB_NODELIST="127.0.0.1", SLURM_SUBMIT_DIR=str(REPO),
               HEAD_NODE="127.0.0.1", NPROC_PER_NODE="1", RDZV_PORT=str(free_port()),
               LOG_ROOT=str(tmp_path / "logs"))


def test_slurm_script_two_nodes(tmp_path, train_args, reference):
    run(["bash", str(LAUNCH / "slurm.sbatch"), *train_args(tmp_path / "run")], env=slurm_env(tmp_path), cwd=REPO)
    assert losses(tmp_path / "run") == pytest.approx(reference, rel=1e-5)
    assert (tmp_path / "logs" / "pretrain-test-4242" / "node0.log").is_file()  # per-job log directory


NEIGHBOUR_STEPS = 6


def _wait(cond, what: str, procs: dict[str, subprocess.Popen], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        for name, proc in procs.items():
            assert proc.poll() is None, f"{name} ended (status {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def _kill_tree(proc: subprocess.Popen) -> None:
    """The launcher and everything it started, by pid (the test's own processes only)."""
    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def test_slurm_preemption_reaches_only_its_job_which_saves_and_resumes(tmp_path, train_args):
    """SIGUSR1 to the batch script (SLURM's warning before the time limit): the trainers finish
    their step, save and exit 0, then the script requeues the job; the requeued job continues from
    that checkpoint, with the losses an uninterrupted run has at those steps (constant LR, so the
    schedule does not depend on max_steps).

    Meanwhile another job trains on the same host (plain torchrun, like `make demo`). It is stopped
    (SIGSTOP, at step 2) while the preemption is forwarded: a signal sent to it then stays pending and
    would stop it as soon as it continues. It must train to its own end."""
    neighbour_dir, run_dir = tmp_path / "neighbour", tmp_path / "run"
    neighbour_log, job_log = tmp_path / "neighbour.log", tmp_path / "sbatch.out"
    with open(neighbour_log, "w") as f:
        neighbour = subprocess.Popen(["bash", str(LAUNCH / "torchrun.sh"), *train_args(neighbour_dir, NEIGHBOUR_STEPS)],
                                     env=env(NPROC_PER_NODE="1", MASTER_PORT=str(free_port()), **{FAULT_ENV: "step@2:stop"}),
                                     stdout=f, stderr=subprocess.STDOUT)
    args = train_args(run_dir, 10_000, "optim.schedule=constant")
    with open(job_log, "w") as f:
        p = subprocess.Popen(["bash", str(LAUNCH / "slurm.sbatch"), *args], env=slurm_env(tmp_path), cwd=REPO,
                             stdout=f, stderr=subprocess.STDOUT)
    try:
        def neighbour_trainer_stopped() -> list:
            return [c for c in psutil.Process(neighbour.pid).children() if c.status() == psutil.STATUS_STOPPED]

        _wait(neighbour_trainer_stopped, "the other job's trainer to stop at step 2", {"the other job": neighbour})
        _wait(lambda: len(losses_or_empty(run_dir)) >= 3, "the SLURM job's step 3", {"the SLURM job": p})
        (trainer,) = neighbour_trainer_stopped()
        p.send_signal(signal.SIGUSR1)
        p.wait(timeout=240)
        trainer.send_signal(signal.SIGCONT)
        neighbour.wait(timeout=240)
    finally:
        for proc in (p, neighbour):
            if proc.poll() is None:
                _kill_tree(proc)
    out, neighbour_out = job_log.read_text(), neighbour_log.read_text()
    assert p.returncode == 0, out[-4000:]
    before = losses(run_dir)
    stopped_at = max(before)
    assert sorted(before) == list(range(1, stopped_at + 1))
    saved = run_dir / "checkpoints" / f"step_{stopped_at:08d}"
    assert (saved / "COMPLETE.json").is_file(), f"no complete checkpoint of step {stopped_at}: {out[-3000:]}"
    assert (tmp_path / "slurm_state" / "scontrol.log").read_text().splitlines() == ["requeue 4242"]
    # The other job trained on, to its own end.
    assert neighbour.returncode == 0 and "SIGUSR1 received" not in neighbour_out, neighbour_out[-4000:]
    assert f"stopping at step {NEIGHBOUR_STEPS}: reached train.max_steps" in neighbour_out, neighbour_out[-4000:]
    assert sorted(losses(neighbour_dir)) == list(range(1, NEIGHBOUR_STEPS + 1))

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
    """The losses logged so far; {} while the file is missing (the trainer not started yet) or ends in
    a half-written line."""
    try:
        return losses(run_dir)
    except (FileNotFoundError, AssertionError, json.JSONDecodeError, KeyError):
        return {}
