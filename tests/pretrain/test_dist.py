"""The distributed path works on CPU from day one: torchrun, 2 ranks, DeepSpeed ZeRO-2, gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _trainer_helpers import run_torchrun_script

from pretrain.dist import (
    all_gather_objects,
    barrier,
    broadcast_flag,
    broadcast_object,
    dist_on,
    strip_launcher_args,
)

HERE = Path(__file__).resolve().parent


def test_strip_launcher_args(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert strip_launcher_args(["--local_rank=3", "train", "c.yaml", "a=1"]) == ["train", "c.yaml", "a=1"]
    assert os.environ["LOCAL_RANK"] == "3"
    monkeypatch.delenv("LOCAL_RANK")
    assert strip_launcher_args(["train", "--local_rank", "1", "c.yaml"]) == ["train", "c.yaml"]
    assert os.environ["LOCAL_RANK"] == "1"


def test_collectives_are_identities_in_one_process():
    """Checkpointer calls them unconditionally; without a process group they must not need one."""
    assert not dist_on()
    barrier()
    obj = {"a": [1, 2]}
    assert broadcast_object(obj) is obj and all_gather_objects(obj) == [obj]
    assert broadcast_flag(True, "cpu") is True and broadcast_flag(False, "cpu") is False


@pytest.mark.slow
def test_torchrun_two_ranks_zero2_on_cpu(tmp_path):
    run_torchrun_script(HERE / "_zero2_toy.py", ["30", str(tmp_path)])
    rows = [json.loads(f.read_text()) for f in sorted(tmp_path.glob("rank*.json"))]
    assert sorted(r["rank"] for r in rows) == [0, 1]
    for r in rows:
        assert r["world"] == 2 and r["backend"] == "gloo" and r["accelerator"] == "cpu"
        assert r["losses"][-1] < 0.5 * r["losses"][0], r["losses"]  # it learns
    # ZeRO-2 keeps replicas identical after every step: parameters agree across ranks.
    assert rows[0]["param"] == rows[1]["param"]


def test_multi_node_srun_without_master_addr_is_a_user_error(monkeypatch):
    """Defaulting to 127.0.0.1 there would leave the other nodes' ranks waiting forever."""
    from pretrain.dist import init_distributed
    from pretrain.errors import UserError

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_NNODES", "2")
    with pytest.raises(UserError, match="MASTER_ADDR is not set"):
        init_distributed()
    assert "RANK" not in os.environ  # refused before touching the environment


_EXIT_SCRIPT = """
import atexit, sys
from pretrain.dist import exit_process, init_distributed
if sys.argv[1] == "dist":
    init_distributed()
atexit.register(lambda: open(sys.argv[2], "w").write("ran"))
print("last line", end="")  # unflushed: exit_process must flush it
exit_process(int(sys.argv[3]))
"""


@pytest.mark.parametrize("mode", ["dist", "plain"])
def test_exit_process_keeps_status_output_and_exit_handlers(tmp_path, mode):
    """A finished run must exit with its own status (not SIGABRT from finalization), having run
    the exit handlers (wandb, multiprocessing) and flushed its output."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    marker = tmp_path / "atexit.txt"
    p = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT, mode, str(marker), "3"], capture_output=True,
                       text=True, timeout=120, env=env)
    assert p.returncode == 3, p.stderr[-2000:]
    assert p.stdout.endswith("last line")
    assert marker.read_text() == "ran"


def test_stderr_lines_of_concurrent_unbuffered_processes_never_share_a_line():
    """Ranks run with `python -u` and share one stderr pipe: each error line is one write (with
    print, the text and its newline are two writes, and lines of different ranks run together)."""
    import subprocess
    import sys

    script = ("import sys; from pretrain.errors import stderr_line\n"
              "for i in range(300): stderr_line(f'error: rank {sys.argv[1]} line {i} ' + 'x' * 300)\n")
    read_end, write_end = os.pipe()
    procs = [subprocess.Popen([sys.executable, "-u", "-c", script, str(r)], stderr=write_end) for r in range(4)]
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        lines = pipe.read().decode().splitlines()
    assert all(p.wait(timeout=60) == 0 for p in procs)
    assert len(lines) == 4 * 300 and all(line.startswith("error: rank ") and line.count("error:") == 1 for line in lines)
