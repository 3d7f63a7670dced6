"""Run by test_hostsync.py under torchrun (1 or 2 ranks, CPU + gloo).

``syncs OUT CORPUS TOKENIZER STAGE...``: the real training loop (``pretrain.trainer.train``) for
each ZeRO stage, with every loop iteration counted from one ``run_step`` to the next by a
DispatchCounter; writes rank<N>.json = {stage: {step: {"syncs": n, "names": {...}}}}.

``equiv OUT CORPUS TOKENIZER STAGE...``: per stage, our device step and DeepSpeed's own step on
the same data (fp32, clipping active, gradient accumulation 2, a NaN loss on rank 0 at step 3);
writes rank<N>.json = {stage: {impl: {"losses": [...], "skipped": [...], "grads_are_flat_views": bool}}}.

Results go to files, not stdout: two ranks printing at once interleave their lines.
"""

import dataclasses
import json
import sys
from pathlib import Path

from pretrain.dist import exit_process, init_distributed

info = init_distributed()

import torch  # noqa: E402

import pretrain.engine as engine_mod  # noqa: E402
import pretrain.trainer as trainer  # noqa: E402
from data_pipelines.loaders import Prefetcher  # noqa: E402
from pretrain.bench.dispatch_count import DispatchCounter  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.stepstats import StepStats  # noqa: E402

mode, out, corpus, tokenizer = sys.argv[1:5]
stages = [int(s) for s in sys.argv[5:]]


def config(run_dir: Path, *overrides: str):
    return load_config(None, [
        "model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.vocab_size=1024", "model.max_seq_len=64",
        "data.seq_len=64", f"data.sources.0.path={corpus}", f"data.tokenizer={tokenizer}", "data.require_scrubbed=false",
        "data.val_fraction=0.05", f"run.dir={run_dir}", "train.micro_batch_size=2", "train.eval_every=0",
        "train.progress_bar=false", "checkpoint.every_steps=0", "checkpoint.save_on_exit=false", "wandb.mode=disabled",
        "optim.warmup_steps=2", *overrides], world_size=info.world_size)


def count_syncs(stage: int) -> dict:
    """Each loop iteration's syncs, from run_step(step) to run_step(step + 1)."""
    per_step: dict[int, dict] = {}
    current: list = []
    real_run_step = trainer.run_step

    def close():
        if current:
            step, counter = current.pop()
            counter.__exit__(None, None, None)
            per_step[step] = {"syncs": counter.syncs, "names": dict(counter.sync_names)}

    def counted_run_step(s, batches, stats, inject_nan=False):
        close()
        counter = DispatchCounter()
        counter.__enter__()
        current.append((len(per_step) + 1, counter))
        return real_run_step(s, batches, stats, inject_nan)

    trainer.run_step = counted_run_step
    try:
        code = trainer.train(config(Path(out) / f"run{stage}", f"deepspeed.zero_stage={stage}", "train.precision=bf16",
                                    "train.max_steps=9", "train.log_every=4"))
    finally:
        trainer.run_step = real_run_step
        close()
    assert code == 0, code
    return per_step


def compare_steps(stage: int) -> dict:
    """Our step and DeepSpeed's own on the same batches; the loss of rank 0 is NaN at step 3."""
    results = {}
    real_path = engine_mod.precision_path
    for impl in ("device", "deepspeed"):
        if impl == "deepspeed":
            engine_mod.precision_path = lambda cfg: dataclasses.replace(real_path(cfg), step="deepspeed")
        try:
            s = trainer.setup(config(Path(out) / f"eq{stage}{impl}", f"deepspeed.zero_stage={stage}",
                                     "train.precision=fp32", "train.grad_accum_steps=2", "train.grad_clip=0.05"),
                              write_run_files=False)
        finally:
            engine_mod.precision_path = real_path
        batches = Prefetcher(s.loader, depth=2)
        stats = StepStats("fp32", "cpu", info.world_size)
        losses, skipped = [], []
        for step in range(1, 7):
            trainer.run_step(s, batches, stats, inject_nan=step == 3 and info.rank == 0)
            r = stats.read()
            losses.append(r.loss)
            skipped.append(r.skipped_steps)
        batches.close()
        opt = s.engine.optimizer
        flat = getattr(opt, "flat_grads", None)
        views = flat is not None and all(
            p.grad is not None and p.grad.untyped_storage().data_ptr() == flat[i].untyped_storage().data_ptr()
            for i, group in enumerate(opt.bit16_groups) for p in group)
        results[impl] = {"losses": losses, "skipped": skipped, "grads_are_flat_views": views,
                         "optimizer": type(opt).__name__}
    return results


torch.manual_seed(0)
run = count_syncs if mode == "syncs" else compare_steps
result = {stage: run(stage) for stage in stages}
with open(f"{out}/rank{info.rank}.json", "w") as f:
    json.dump(result, f)
exit_process(0)
