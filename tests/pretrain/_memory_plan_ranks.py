"""Run under torchrun by test_memory_plan.py: what a real DeepSpeed engine holds on each rank.

For every case (a list of config overrides, argv[2] as JSON) it builds the model and the engine
exactly as training does, runs two optimizer steps and records, per rank, the bytes of all live
tensor storages (parameters, their gradients, optimizer states, DeepSpeed's buffers) beyond
those alive before the model was built: after every backward (gradients held) and after the
last step (what stays). Scalars (0-dim: step counters, norms, the loss) and boolean flags are
left out, as the plan leaves them out. Writes OUT_DIR/rank<N>.json.
"""

import gc
import json
import sys

from pretrain.dist import exit_process, init_distributed

info = init_distributed()

import torch  # noqa: E402

from pretrain.config import load_config  # noqa: E402
from pretrain.engine import build_engine, model_init_context  # noqa: E402
from pretrain.model import Transformer  # noqa: E402


def live_storages() -> dict:
    """data_ptr -> storage, for every tensor storage (and parameter gradient) Python can reach.
    Holding the result keeps those storages, so their addresses cannot be reused meanwhile."""
    out = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
            for t in (obj, obj._grad if obj.is_leaf else None):
                if t is not None and t.dim() > 0 and t.dtype != torch.bool:
                    s = t.untyped_storage()
                    if s.data_ptr():
                        out[s.data_ptr()] = s
    return out


def held_beyond(before: dict) -> int:
    gc.collect()
    return sum(s.nbytes() for ptr, s in live_storages().items() if ptr not in before)


results = []
for overrides in json.loads(sys.argv[2]):
    cfg = load_config(None, overrides, world_size=info.world_size)
    t = cfg.train
    ids = torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, cfg.data.seq_len))
    gc.collect()
    before = live_storages()
    torch.manual_seed(0)
    with model_init_context(cfg, info):
        model = Transformer(cfg.model)
    engine, _ = build_engine(cfg, model, info, None)
    del model
    after_backward = []
    for _ in range(2 * t.grad_accum_steps):
        loss = engine(input_ids=ids, labels=ids)
        engine.backward(loss)
        del loss
        after_backward.append(held_beyond(before))
        engine.step()
    results.append({"overrides": overrides, "after_backward": max(after_backward), "after_step": held_beyond(before)})
    del engine
    gc.collect()

with open(f"{sys.argv[1]}/rank{info.rank}.json", "w") as f:
    json.dump({"rank": info.rank, "world": info.world_size, "results": results}, f)
torch.distributed.barrier()
exit_process(0)
