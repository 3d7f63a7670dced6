"""Run under torchrun by test_checkpoint_*.py: a tiny DeepSpeed engine driven through Checkpointer.

Exercises every RNG the real loop may touch (torch dropout, numpy and python noise) and a loader
whose state is a global sample index, so exact resume and elastic resume can be checked without
the full trainer. Prints one JSON line per step per rank: {"rank", "step", "loss", "samples"}.

usage: _checkpoint_harness.py CKPT_DIR ZERO_STAGE MAX_STEPS EVERY [KILL_AT_STEP] [RESUME]
(PRETRAIN_CKPT_FAULT in the environment injects a crash inside a save.)
"""

import json
import os
import random
import signal
import sys

from pretrain.dist import exit_process, init_distributed
from pretrain.logging_setup import setup_logging

info = init_distributed()
setup_logging("info")

import deepspeed  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import pretrain.checkpoint.checkpointer as checkpointer_module  # noqa: E402
from pretrain.checkpoint import Checkpointer, TrainState  # noqa: E402
from pretrain.config import load_config  # noqa: E402

ckpt_dir, stage, max_steps, every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
kill_at = int(sys.argv[5]) if len(sys.argv) > 5 else -1
resume = sys.argv[6] if len(sys.argv) > 6 else "auto"
MICRO = 4

cfg = load_config(None, [f"checkpoint.dir={ckpt_dir}", f"checkpoint.every_steps={every}", "checkpoint.keep_last=2",
                         f"checkpoint.resume={resume}", f"deepspeed.zero_stage={stage}", "train.precision=fp32"],
                  world_size=info.world_size)

torch.manual_seed(0)
np.random.seed(1 + info.rank)
random.seed(2 + info.rank)
model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Dropout(0.1), torch.nn.GELU(), torch.nn.Linear(64, 64),
                            torch.nn.GELU(), torch.nn.Linear(64, 1))
ds_config = {
    "train_micro_batch_size_per_gpu": MICRO,
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 1.0,
    "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True, "weight_decay": 0.1}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 3, "total_num_steps": 40,
                                                       "warmup_min_lr": 0.0, "warmup_max_lr": 1e-2}},
}
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)

# The loader state here is a global sample index, identical on every rank, so any world size can
# continue from it: this stands in for data_pipelines.loaders.reshard_states, which expects the
# stream loader's state.
checkpointer_module.reshard_states = lambda states, n, workers: [{"next": states[0]["next"]} for _ in range(n)]
ckpt = Checkpointer(cfg, engine, info, tokenizer_path=None)
resumed = ckpt.resume()
state, loader = (resumed[0], resumed[1]) if resumed else (TrainState(), {"next": 0})
W = torch.tensor([[0.5 - 0.1 * i] for i in range(16)])


def emit(row: dict) -> None:
    os.write(1, (json.dumps(row) + "\n").encode())  # one write: lines of both ranks never interleave


def batch(first: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    idx = [first + info.rank * MICRO + j for j in range(MICRO)]
    xs = torch.stack([torch.randn(16, generator=torch.Generator().manual_seed(i)) for i in idx])
    return xs, torch.tanh(xs @ W), idx


while state.step < max_steps:
    x, y, idx = batch(loader["next"])
    x = x + float(np.random.randn()) * 0.01 + random.random() * 0.01  # numpy + python RNG in the step
    loss = torch.nn.functional.mse_loss(engine(x), y)
    engine.backward(loss)
    engine.step()
    loader["next"] += MICRO * info.world_size
    state.step += 1
    state.tokens_seen += MICRO * info.world_size
    emit({"rank": info.rank, "step": state.step, "loss": loss.item(), "samples": idx,
          "lr": engine.get_lr()[0], "global_steps": engine.global_steps})
    if state.step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    if ckpt.due(state.step):
        ckpt.save(state, dict(loader))
emit({"rank": info.rank, "done": state.step})
torch.distributed.barrier()  # no rank leaves while another is still in a collective
exit_process(0)
