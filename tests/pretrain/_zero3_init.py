"""Run under torchrun by test_engine.py: the model built inside deepspeed.zero.Init (ZeRO-3) must
equal, parameter by parameter, the model built whole from the same seed, while each rank holds
only its partition. Writes OUT_DIR/rank<N>.json."""

import json
import sys

from pretrain.dist import exit_process, init_distributed

info = init_distributed()

import deepspeed  # noqa: E402
import torch  # noqa: E402

from pretrain.config import load_config  # noqa: E402
from pretrain.engine import model_init_context  # noqa: E402
from pretrain.model import Transformer  # noqa: E402

cfg = load_config(None, ["deepspeed.zero_stage=3", "train.precision=fp32", "deepspeed.stage3_param_persistence_threshold=0",
                         "model.vocab_size=300", "model.n_layers=2", "model.d_model=64", "model.n_heads=4",
                         "model.n_kv_heads=2", "model.max_seq_len=64", "data.seq_len=64"], world_size=info.world_size)
torch.manual_seed(0)
whole = Transformer(cfg.model)
torch.manual_seed(0)
with model_init_context(cfg, info):
    part = Transformer(cfg.model)
differ = []
for (name, a), (_, b) in zip(whole.named_parameters(), part.named_parameters(), strict=True):
    with deepspeed.zero.GatheredParameters([b]):
        if not torch.equal(a, b.data):
            differ.append(name)
result = {"rank": info.rank, "differ": differ, "partitioned": all(hasattr(p, "ds_id") for p in part.parameters()),
          "local": sum(p.ds_tensor.numel() for p in part.parameters()), "total": sum(p.numel() for p in whole.parameters())}
with open(f"{sys.argv[1]}/rank{info.rank}.json", "w") as f:
    json.dump(result, f)
torch.distributed.barrier()
exit_process(0)
