"""Run under torchrun by test_checkpoint_*.py: a tiny DeepSpeed engine driven through Checkpointer.

Exercises every RNG the real loop may touch (torch dropout, numpy and python noise) and the REAL
streaming loader (``data_pipelines.loaders.build_train_loader``, data section of CONFIG): its state
is saved by the Checkpointer and, when the world size changes, remapped by the real
``reshard_states``, so exact and elastic resume are checked without the full trainer. Prints one
JSON line per step per rank: {"rank", "step", "loss", "probe", "samples", "lr", "global_steps"};
"samples" are the input token ids this rank consumed (windows overlap by one token, so the rows'
inputs, concatenated in step order, are exactly this rank's token stream); "probe" is the loss on
a fixed input before the step (eval mode, no update): the same weights give it bitwise.

usage: _checkpoint_harness.py CONFIG CKPT_DIR ZERO_STAGE MAX_STEPS EVERY [KILL_AT_STEP] [RESUME]
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

from data_pipelines.loaders import build_train_loader  # noqa: E402
from pretrain.checkpoint import Checkpointer, TrainState  # noqa: E402
from pretrain.config import load_config  # noqa: E402

config, ckpt_dir, stage, max_steps, every = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
kill_at = int(sys.argv[6]) if len(sys.argv) > 6 else -1
resume = sys.argv[7] if len(sys.argv) > 7 else "auto"

cfg = load_config(config, [f"checkpoint.dir={ckpt_dir}", f"checkpoint.every_steps={every}", "checkpoint.keep_last=2",
                         f"checkpoint.resume={resume}", f"deepspeed.zero_stage={stage}", "train.precision=fp32"],
                  world_size=info.world_size)
MICRO = cfg.train.micro_batch_size
assert cfg.data.seq_len == 16 and cfg.data.num_workers == 0, "the model below reads 16 tokens per sample"

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

ckpt = Checkpointer(cfg, engine, info, tokenizer_path=None)
loader = build_train_loader(cfg, info.rank, info.world_size)
resumed = ckpt.resume()
state = resumed[0] if resumed else TrainState()
if resumed:
    loader.load_state_dict(resumed[1])
W = torch.tensor([[0.5 - 0.1 * i] for i in range(16)])
PROBE = torch.randn(8, 16, generator=torch.Generator().manual_seed(123))


def emit(row: dict) -> None:
    os.write(1, (json.dumps(row) + "\n").encode())  # one write: lines of both ranks never interleave


def batch() -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    ids = next(loader)["input_ids"]  # [MICRO, 16] token ids of the real loader
    xs = (ids % 97).float() / 48.0 - 1.0
    return xs, torch.tanh(xs @ W), ids.tolist()


def probe() -> float:
    engine.eval()
    with torch.no_grad():
        loss = torch.nn.functional.mse_loss(engine(PROBE), torch.tanh(PROBE @ W)).item()
    engine.train()
    return loss


while state.step < max_steps:
    before = probe()
    x, y, idx = batch()
    x = x + float(np.random.randn()) * 0.01 + random.random() * 0.01  # numpy + python RNG in the step
    loss = torch.nn.functional.mse_loss(engine(x), y)
    engine.backward(loss)
    engine.step()
    state.step += 1
    state.tokens_seen += MICRO * cfg.data.seq_len * info.world_size
    emit({"rank": info.rank, "step": state.step, "loss": loss.item(), "probe": before, "samples": idx,
          "lr": engine.get_lr()[0], "global_steps": engine.global_steps})
    if state.step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    if ckpt.due(state.step):
        ckpt.save(state, loader.state_dict())
emit({"rank": info.rank, "done": state.step})
torch.distributed.barrier()  # no rank leaves while another is still in a collective
exit_process(0)
