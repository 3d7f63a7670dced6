"""Training processes die with their launcher (PR_SET_PDEATHSIG or the polling fallback), and
DataLoader workers die with the trainer (torch's own worker watchdog)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.parent_death import started_by_launcher
from pretrain.run_lease import pid_alive

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _wait_gone(pids: list[int], within: float = 20.0) -> list[int]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        alive = [p for p in pids if pid_alive(p)]
        if not alive:
            return []
        time.sleep(0.1)
    return alive


def _launcher(tmp_path: Path, worker_body: str) -> tuple[subprocess.Popen, int]:
    """A stand-in launcher (like torchrun's agent) starting one worker in a session of its own;
    returns the launcher and the worker's pid once the worker is armed."""
    ready = tmp_path / "worker.pid"
    worker = f"""
import os, sys, time
parent = os.getppid()
from pretrain import parent_death
{worker_body}
open({str(ready)!r} + ".tmp", "w").write(str(os.getpid())); os.rename({str(ready)!r} + ".tmp", {str(ready)!r})
time.sleep(600)
"""
    launcher = f"""
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", {worker!r}], start_new_session=True)
time.sleep(600)
"""
    p = subprocess.Popen([sys.executable, "-c", launcher], env={**ENV, "RANK": "0"})
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert time.monotonic() < deadline and p.poll() is None
        time.sleep(0.05)
    return p, int(ready.read_text())


@pytest.mark.parametrize("how", ["prctl", "thread"])
def test_worker_dies_when_its_launcher_is_killed(tmp_path, how):
    body = "assert parent_death.arm_parent_death(parent, poll_s=0.2) == 'prctl'"
    if how == "thread":
        body = "parent_death._prctl_pdeathsig = lambda sig: False\n" + body.replace("'prctl'", "'thread'")
    launcher, worker = _launcher(tmp_path, body)
    assert pid_alive(worker)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    assert _wait_gone([worker]) == []


def test_parent_dead_before_arming_kills_at_once(tmp_path):
    """The launcher died between the worker's start and prctl: the kernel will never signal, the
    parent check must."""
    flag = tmp_path / "launcher.dead"
    body = f"""
while not os.path.exists({str(flag)!r}):
    time.sleep(0.05)
time.sleep(0.5)
parent_death.arm_parent_death(parent)
"""
    ready = tmp_path / "worker.pid"
    worker = f"import os, sys, time\nparent = os.getppid()\nopen({str(ready)!r}, 'w').write(str(os.getpid()))\n" \
             f"from pretrain import parent_death\n{body}\nopen({str(tmp_path / 'survived')!r}, 'w').write('x')\n"
    launcher = subprocess.Popen([sys.executable, "-c", f"""
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", {worker!r}], start_new_session=True)
time.sleep(600)
"""], env=ENV)
    deadline = time.monotonic() + 60
    while not ready.exists() or not ready.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    pid = int(ready.read_text())
    launcher.kill()
    launcher.wait()
    flag.write_text("x")
    assert _wait_gone([pid]) == []
    assert not (tmp_path / "survived").exists()


def test_only_launched_processes_are_armed():
    assert not started_by_launcher({"PATH": "/bin"})  # plain python: nohup must keep it alive
    assert started_by_launcher({"RANK": "0"}) and started_by_launcher({"SLURM_PROCID": "3"})


def test_dataloader_workers_die_with_the_trainer(tmp_path):
    """torch's ManagerWatchdog ends a DataLoader worker whose trainer was SIGKILLed (checked every 5 s)."""
    pids = tmp_path / "pids"
    script = f"""
import itertools, os, time
from torch.utils.data import IterableDataset
from data_pipelines.loading.stream import worker_iter
class Forever(IterableDataset):
    def __iter__(self):
        for i in itertools.count():
            time.sleep(0.01)
            yield i
it = worker_iter(Forever(), num_workers=2, prefetch=2)
next(it)
import psutil
open({str(pids)!r} + ".tmp", "w").write(" ".join(str(c.pid) for c in psutil.Process().children()))
os.rename({str(pids)!r} + ".tmp", {str(pids)!r})
time.sleep(600)
"""
    p = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=ENV)
    try:
        deadline = time.monotonic() + 120
        while not pids.exists():
            assert time.monotonic() < deadline and p.poll() is None
            time.sleep(0.1)
        workers = [int(x) for x in pids.read_text().split()]
        assert len(workers) == 2 and all(pid_alive(w) for w in workers)
    finally:
        p.kill()
        p.wait()
    assert _wait_gone(workers, within=30) == []
