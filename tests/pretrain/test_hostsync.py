"""The training step never waits on the host outside logging steps, on 1 and 2 ranks (CPU + gloo).

Host syncs are counted with pretrain.bench.dispatch_count in the real loop (pretrain.trainer.train),
from one step's run_step to the next: every read of a device value there dispatches an operator
(``_local_scalar_dense``, ``is_nonzero``, ...) on the CPU as it would on a GPU.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from _trainer_helpers import (
    run_torchrun_script,
    tiny_data_fixture,  # noqa: F401 - registers the tiny_data fixture
)

HERE = Path(__file__).resolve().parent
STAGES = ("0", "1", "2")  # the device-step path (pretrain.engine.precision_path)


def _ranks(tmp_path: Path, nproc: int) -> list[dict]:
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(nproc)]


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_no_host_sync_outside_logging_steps(tiny_data, tmp_path, nproc):
    """train.log_every=4, max_steps=9: steps 4 and 8 log and step 9 decides the stop (reads);
    every other step, the loop with its stop agreement and accounting, dispatches no host sync."""
    run_torchrun_script(HERE / "_hostsync_ranks.py", ["syncs", str(tmp_path), str(tiny_data["corpus"]),
                                                      str(tiny_data["tokenizer"]), *STAGES], nproc=nproc, timeout=600)
    for rank, result in enumerate(_ranks(tmp_path, nproc)):
        for stage in STAGES:
            steps = {int(k): v for k, v in result[stage].items()}
            assert sorted(steps) == list(range(1, 10)), (rank, stage)
            quiet = {s: c for s, c in steps.items() if s not in (4, 8, 9)}
            assert all(c["syncs"] == 0 for c in quiet.values()), (rank, stage, quiet)
            assert steps[4]["syncs"] > 0, (rank, stage)  # the logging step's read is seen: the counter works


@pytest.mark.slow
def test_flat_zero_step_matches_deepspeeds_own_step(tiny_data, tmp_path):
    """ZeRO-1 (flat gradients) and ZeRO-2 on 2 ranks, fp32, clipping active, accumulation 2: the same
    losses as DeepSpeed's own step, and a NaN on one rank skips the update on both, identically."""
    run_torchrun_script(HERE / "_hostsync_ranks.py", ["equiv", str(tmp_path), str(tiny_data["corpus"]),
                                                      str(tiny_data["tokenizer"]), "1", "2"], nproc=2, timeout=600)
    r0, r1 = _ranks(tmp_path, 2)
    for stage, ours_name in (("1", "FlatGradsZeroStep"), ("2", "FlatZeroStep")):
        ours, theirs = r0[stage]["device"], r0[stage]["deepspeed"]
        assert ours["optimizer"] == ours_name and theirs["optimizer"] == "DeepSpeedZeroOptimizer"
        assert ours["skipped"] == theirs["skipped"] == [0, 0, 1, 1, 1, 1], stage
        assert math.isnan(ours["losses"][2]) and math.isnan(theirs["losses"][2])
        finite = [i for i in range(6) if i != 2]
        assert max(abs(ours["losses"][i] - theirs["losses"][i]) for i in finite) < 1e-5, (stage, ours, theirs)
        assert ours["losses"][5] < ours["losses"][0]  # it trains
        for impl in ("device", "deepspeed"):  # both ranks read the same reduced values
            a, b = r0[stage][impl]["losses"], r1[stage][impl]["losses"]
            assert all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b, strict=True))
    assert r0["1"]["device"]["grads_are_flat_views"]  # backward accumulated straight into the flat buffer
