"""Run by test_dist.py under torchrun: a DeepSpeed ZeRO-2 engine on a toy module, CPU + gloo.

Writes rank<N>.json (losses, a parameter slice) into argv[2], so the test can check that ranks
agree and learn (files, not stdout: two ranks printing at once interleave their lines).
"""

import json
import sys

from pretrain.dist import exit_process, init_distributed

info = init_distributed()  # must pick the CPU accelerator and gloo by itself

import deepspeed  # noqa: E402
import torch  # noqa: E402

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
ds_config = {
    "train_micro_batch_size_per_gpu": 8,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 2},
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
}
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
gen = torch.Generator().manual_seed(100 + info.rank)  # each rank sees its own data
w = torch.randn(16, 1, generator=torch.Generator().manual_seed(7))
losses = []
for _ in range(int(sys.argv[1])):
    x = torch.randn(8, 16, generator=gen)
    loss = torch.nn.functional.mse_loss(engine(x), x @ w)
    engine.backward(loss)
    engine.step()
    losses.append(loss.item())
first = [p.detach().flatten()[:4].tolist() for p in engine.module.parameters()][0]
import deepspeed.accelerator as acc  # noqa: E402

result = {"rank": info.rank, "world": info.world_size, "backend": info.backend,
          "accelerator": acc.get_accelerator().device_name(), "losses": losses, "param": first}
with open(f"{sys.argv[2]}/rank{info.rank}.json", "w") as f:
    json.dump(result, f)
exit_process(0)
