"""`python -m pretrain train`, then logits of the LIVE engine's weights (run under torchrun).

    _live_logits.py OUT CONFIG [key=value ...]

The export test's reference must not come from the checkpoint files the exporter reads, or a
reassembly bug (a dropped or permuted ZeRO-3 partition) would cancel out. So this script wraps the
trainer's ``setup`` to keep the Session, runs ``pretrain.__main__.main`` (training and the final
save), and then, still in the training processes, gathers every parameter of the engine
(``deepspeed.zero.GatheredParameters``: a collective, all ranks take part; for ZeRO-1/2 the
parameters are whole already), copies them into a fresh ``Transformer`` and computes fp32 logits on
fixed token ids. Rank 0 writes ``{"ids", "logits", "embed_rows"}`` to OUT with ``torch.save``.
Production code is unchanged.
"""

from __future__ import annotations

import sys

import torch

import pretrain.trainer as trainer
from pretrain.__main__ import main
from pretrain.dist import exit_process
from pretrain.model import Transformer

out, argv = sys.argv[1], sys.argv[2:]
kept: dict = {}
real_setup = trainer.setup


def setup(*args, **kwargs):
    kept["session"] = session = real_setup(*args, **kwargs)
    return session


trainer.setup = setup
rc = main(["train", *argv])
if rc == 0:
    import deepspeed  # only after main() chose the accelerator (importing it earlier picks one itself)

    s = kept["session"]
    live = dict(s.engine.module.named_parameters())
    if s.cfg.deepspeed.zero_stage == 3:  # each rank holds only its partition: nothing whole before the gather
        assert all(p.numel() == 0 for p in live.values()), [k for k, p in live.items() if p.numel()]
    with deepspeed.zero.GatheredParameters(list(live.values())), torch.no_grad():
        weights = {k.removeprefix("module."): p.detach().float().clone() for k, p in live.items()}
    if s.info.rank == 0:
        model = Transformer(s.cfg.model).float().eval()
        own = dict(model.named_parameters())
        assert own.keys() == weights.keys(), sorted(own.keys() ^ weights.keys())
        with torch.no_grad():
            for k, p in own.items():
                assert p.shape == weights[k].shape, (k, p.shape, weights[k].shape)
                p.copy_(weights[k])
            ids = torch.randint(0, s.cfg.model.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
            logits = model(ids)
        torch.save({"ids": ids, "logits": logits, "embed_rows": own["embed.weight"].shape[0]}, out)
exit_process(rc)
