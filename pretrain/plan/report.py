"""`python -m pretrain plan CONFIG --gpus 1,8,64`: the plan as a table, then one JSON line."""

from __future__ import annotations

import json
from pathlib import Path

from pretrain.config import Config
from pretrain.errors import UserError
from pretrain.plan.network import INFINIBAND_GBS, NVLINK_GBS
from pretrain.plan.planner import GIB, MAX_MICRO_BATCH, GpuPlan, Planner, check_bench


def read_bench(path: str | None) -> dict | None:
    if path is None:
        return None
    try:
        lines = [x for x in Path(path).read_text().splitlines() if x.startswith("{")]
        return json.loads(lines[-1])
    except (OSError, IndexError, json.JSONDecodeError) as e:
        raise UserError(f"--bench-json {path}: cannot read a `pretrain bench` JSON line ({e})") from None


def run_plan(cfg: Config, config_path: str, gpus: list[int], memory_gib: float, bench_path: str | None = None,
             bus_gbs: float | None = None, gpus_per_node: int = 8) -> int:
    """Print the plan table for ``gpus`` and, last, one JSON object (``plans`` per GPU count)."""
    bench = read_bench(bench_path)
    planner = Planner(cfg)
    if bench is not None:
        check_bench(bench, planner.cfg, planner.n_params, bench_path or "")
    memory = int(memory_gib * GIB)
    plans = [planner.plan(n, memory, bench, bus_gbs, gpus_per_node) for n in gpus]
    print(render(planner, config_path, plans, bench is not None, bus_gbs, gpus_per_node))
    c = planner.cfg
    print(json.dumps({
        "config": config_path, "params": planner.n_params, "precision": c.train.precision,
        "zero_stage": c.deepspeed.zero_stage, "micro_batch_size": c.train.micro_batch_size,
        "grad_accum_steps": c.train.grad_accum_steps, "seq_len": c.data.seq_len,
        "activation_checkpointing": c.model.activation_checkpointing, "gpu_memory_bytes": memory,
        "max_micro_batch_searched_up_to": MAX_MICRO_BATCH,
        "plans": [p.as_json() for p in plans],
    }), flush=True)
    return 0


def render(planner: Planner, config_path: str, plans: list[GpuPlan], with_bench: bool, bus_gbs: float | None,
           gpus_per_node: int) -> str:
    c = planner.cfg
    t, m = c.train, c.model

    def gib(x: int) -> str:
        return f"{x / GIB:.2f}"

    def secs(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    rows: list[tuple[str, list[str]]] = [
        ("parameters", [gib(p.states.params) for p in plans]),
        ("gradients", [gib(p.states.grads) for p in plans]),
        ("optimizer states (fp32 master + AdamW)", [gib(p.states.optimizer) for p in plans]),
        ("DeepSpeed buffers (ZeRO-3 reduce bucket)", [gib(p.states.buffers) for p in plans]),
        ("model buffers (RoPE tables)", [gib(p.activations.model_buffers) for p in plans]),
        (f"activations, one micro-batch of {t.micro_batch_size}", [gib(p.activations.peak) for p in plans]),
        ("  of which the chunked loss", [gib(p.activations.loss_temp) for p in plans]),
        ("backward temporaries (buckets, gathers)", [gib(p.states.backward_temp) for p in plans]),
        ("step temporaries (fp32 gradient copies)", [gib(p.states.step_temp) for p in plans]),
        ("offloaded to CPU memory", [gib(p.states.host) for p in plans]),
        ("PEAK per GPU", [f"{gib(p.total_bytes)} ({p.peak_phase.replace('_', '/')})" for p in plans]),
        ("GPU memory", [gib(p.memory_bytes) for p in plans]),
        ("fits", ["yes" if p.fits else f"NO, over by {gib(p.total_bytes - p.memory_bytes)}" for p in plans]),
        ("largest micro-batch that fits", [f"{p.max_micro_batch}+" if p.max_micro_batch == MAX_MICRO_BATCH
                                           else str(p.max_micro_batch) for p in plans]),
        ("collectives per step, GB sent per GPU", [f"{p.comm.total / 1e9:.2f}" for p in plans]),
        ("bus bandwidth, GB/s", [f"{p.bus_gbs:g}" for p in plans]),
        ("communication, s", [secs(p.comm_s) for p in plans]),
        ("compute (from the bench), s", [secs(p.compute_s) for p in plans]),
        ("step time, s", [secs(p.step_time_s) for p in plans]),
    ]
    head = ["GiB per GPU unless stated"] + [f"{p.gpus} GPU" + ("s" if p.gpus > 1 else "") for p in plans]
    width0 = max(len(head[0]), *(len(r[0]) for r in rows))
    widths = [max(len(head[i + 1]), *(len(r[1][i]) for r in rows)) for i in range(len(plans))]
    lines = [
        f"memory plan of {config_path}: {planner.n_params / 1e9:.3g}B parameters, {t.precision}, "
        f"ZeRO-{c.deepspeed.zero_stage}, micro-batch {t.micro_batch_size} x {c.data.seq_len} tokens, "
        f"{t.grad_accum_steps} accumulation step(s), activation checkpointing {m.activation_checkpointing}",
        "  ".join([head[0].ljust(width0)] + [h.rjust(w) for h, w in zip(head[1:], widths, strict=True)]),
    ]
    lines += ["  ".join([name.ljust(width0)] + [v.rjust(w) for v, w in zip(vals, widths, strict=True)]) for name, vals in rows]
    bw = (f"bus bandwidth {bus_gbs:g} GB/s (given)" if bus_gbs is not None else
          f"bus bandwidth: NVLink {NVLINK_GBS:g} GB/s up to {gpus_per_node} GPUs, InfiniBand {INFINIBAND_GBS:g} GB/s "
          "per GPU beyond (line rates; --bus-bandwidth-gbs to use your nccl-tests busbw)")
    lines += [
        "assumes: data parallelism only; activations traced on fake tensors as a GPU runs the model"
        + (" (eagerly: model.compile may need less)" if m.compile else "") + "; " + bw
        + ("" if with_bench else "; no --bench-json, so no compute or step time"),
    ]
    return "\n".join(lines)
