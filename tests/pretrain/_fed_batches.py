"""`python -m pretrain train` that records what the trainer fed the model (run under torchrun).

    _fed_batches.py OUT STOP_AT_STEP CONFIG [key=value ...]

Production code is unchanged: this script wraps the trainer's module-level helpers before calling
``pretrain.__main__.main``. ``train_step`` is wrapped to know the step being trained, and
``_to_device`` (through which every batch reaches the engine) to copy that step's ``input_ids``;
rank r writes one JSON line per step to ``OUT.rank{r}.jsonl``. The step numbers start after the
step the Checkpointer resumed from. With STOP_AT_STEP > 0 each rank sends itself SIGTERM as that
step starts: the trainer finishes the step, saves (checkpoint.save_on_exit) and exits 0, exactly
as on a preemption, so a phase ends at a chosen step without changing train.max_steps (which would
change the LR schedule).

Break switch, run by ``test_the_loss_check_catches_a_broken_resume`` (the elastic loss check must
fail with it): ``ELASTIC_TEST_BREAK=optimizer`` loads the engine state, then drops the optimizer's
moments and step count (it wraps ``Checkpointer._load_engine``, same signature).
"""

from __future__ import annotations

import json
import os
import signal
import sys

import pretrain.checkpoint as checkpoint
import pretrain.trainer as trainer
from pretrain.__main__ import main

out, stop_at, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
rank = int(os.environ.get("RANK", "0"))
records: list[dict] = []
now = {"start": 0, "calls": 0, "step": None}

real_resume = checkpoint.Checkpointer.resume
real_train_step = trainer.train_step
real_to_device = trainer._to_device


def resume(self):
    got = real_resume(self)
    now["start"] = got[0].step if got is not None else 0
    return got


def train_step(engine, batches, accum, device, inject_nan=False):
    now["calls"] += 1
    now["step"] = step = now["start"] + now["calls"]
    if step == stop_at:
        os.kill(os.getpid(), signal.SIGTERM)  # handled by the trainer's StopSignals (main thread)
    try:
        return real_train_step(engine, batches, accum, device, inject_nan)
    finally:
        now["step"] = None


def to_device(batch, device):
    if now["step"] is not None:  # a training micro-batch (evaluation batches pass here too)
        records.append({"step": now["step"], "rank": rank, "input_ids": batch["input_ids"].tolist()})
    return real_to_device(batch, device)


checkpoint.Checkpointer.resume = resume
trainer.train_step = train_step
trainer._to_device = to_device

broken = os.environ.get("ELASTIC_TEST_BREAK", "")
if broken == "optimizer":
    real_load_engine = checkpoint.Checkpointer._load_engine

    def load_engine_then_drop_optimizer_state(self, plan):
        real_load_engine(self, plan)
        self.engine.optimizer.optimizer.state.clear()  # the torch AdamW inside ZeRO: moments and step count

    checkpoint.Checkpointer._load_engine = load_engine_then_drop_optimizer_state
elif broken:
    sys.exit(f"ELASTIC_TEST_BREAK={broken!r}: expected optimizer")

rc = main(["train", *argv])
with open(f"{out}.rank{rank}.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
sys.exit(rc)
