"""Signals stay inside the job: nothing in the launchers, the packages or the tests signals
processes by name pattern (it reaches other jobs' and other users' processes on a shared node).
Preemption is forwarded with `scancel --signal=USR1 $SLURM_JOB_ID` (launch/slurm.sbatch); tests
signal the processes they started, by pid."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BY_NAME = re.compile(r"\b(pkill|killall|pgrep)\b")


def test_nothing_signals_processes_by_name():
    files = [REPO / "Makefile", *(REPO / "launch").iterdir()]
    for pkg in ("pretrain", "data_pipelines", "tests"):
        files += (REPO / pkg).rglob("*.py")
    hits = [f"{f.relative_to(REPO)}:{n}: {line.strip()}" for f in files if f.is_file() and f != Path(__file__)
            for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1) if BY_NAME.search(line)]
    assert not hits, "signals by name pattern:\n" + "\n".join(hits)

