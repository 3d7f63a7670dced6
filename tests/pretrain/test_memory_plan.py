"""`pretrain plan` and the start-up memory check (pretrain/plan/): DeepSpeed's model-state bytes
per rank against a real engine, the activation trace, the search for the largest micro-batch,
collective volumes, the command line and `pretrain train`'s refusal to start a config that cannot
fit."""

from __future__ import annotations

import ctypes
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _trainer_helpers import REPO, run_torchrun_script
from torch.utils._python_dispatch import TorchDispatchMode

from pretrain.config import load_config
from pretrain.engine import resolve_precision
from pretrain.errors import UserError
from pretrain.plan.activations import LiveBytes, run_cuda_kernels, trace
from pretrain.plan.check import check_memory_plan, with_settings
from pretrain.plan.network import collectives
from pretrain.plan.planner import GIB, Planner, check_bench, compute_time_s
from pretrain.plan.states import UnplannableError, model_states, zero3_sub_groups, zero12_partitions

# Odd sizes on purpose (vocabulary 301 unpadded, d_model 50, one key/value head): DeepSpeed pads
# the parameter groups (84,650 and 15,300 elements) to multiples of 2 x ranks and splits them.
TINY = ["model.vocab_size=301", "model.vocab_multiple_of=1", "model.n_layers=2", "model.d_model=50", "model.n_heads=5",
        "model.n_kv_heads=1", "model.max_seq_len=32", "data.seq_len=32", "train.micro_batch_size=2",
        "deepspeed.reduce_bucket_size=5000", "deepspeed.allgather_bucket_size=5000",
        "deepspeed.stage3_prefetch_bucket_size=3000"]


def tiny(*overrides: str, world: int = 1):
    return load_config(None, [*TINY, *overrides], world_size=world)


# --------------------------------------------------------------------------------------------
# DeepSpeed's layout
# --------------------------------------------------------------------------------------------


def test_zero12_slices_pad_to_twice_the_ranks_and_hold_every_overlapping_parameter():
    # 15 elements pad to 16 (4-byte alignment x 2 ranks): slices [0, 8) and [8, 16). Rank 0 holds
    # the gradients of the parameters starting in its slice (5 and 7 elements), rank 1 those of
    # the one straddling its start (7), the last (3) and a zero for the padding element.
    assert zero12_partitions([5, 7, 3], 2) == (8, [12, 11])
    assert zero12_partitions([5, 7, 3], 1) == (16, [16])
    assert zero12_partitions([3], 4) == (2, [3, 4, 2, 2])  # slices past the parameters: zeros


def test_zero3_sub_groups_close_once_they_reach_the_sub_group_size():
    assert zero3_sub_groups([10, 10, 10, 10], 2, 12) == [15, 5]
    assert zero3_sub_groups([10, 11], 4, 10**9) == [6]  # ceil(10/4) + ceil(11/4)


def test_layout_comes_from_the_generated_deepspeed_config():
    p = Planner(tiny("deepspeed.zero_stage=2", "deepspeed.overlap_comm=false"), target="cpu")
    z = p.layout(4)
    assert (z.stage, z.reduce_bucket_size, z.overlap_comm, z.param_bytes) == (2, 5000, False, 2)
    # ZeRO-2's reduce buckets: one of reduce_bucket_size elements without overlap_comm, two with.
    assert model_states(z, p.groups, 4).backward_temp == 5000 * 2
    with pytest.raises(UnplannableError, match="round_robin_gradients"):
        Planner(tiny("deepspeed.extra.zero_optimization.round_robin_gradients=true"), target="cpu").layout(2)


# The matrix the engine is held to: every stage at 1, 2 and 4 ranks, both precisions, gradient
# accumulation (ZeRO-1 keeps whole gradients before the boundary), persistent ZeRO-3 parameters
# and ZeRO-3 built whole or inside zero.Init.
CASES = {
    1: ["deepspeed.zero_stage=0 train.precision=fp32", "deepspeed.zero_stage=1 train.precision=bf16",
        "deepspeed.zero_stage=2 train.precision=fp32", "deepspeed.zero_stage=3 train.precision=bf16"],
    2: ["deepspeed.zero_stage=0 train.precision=bf16", "deepspeed.zero_stage=1 train.precision=fp32 train.grad_accum_steps=2",
        "deepspeed.zero_stage=2 train.precision=bf16 train.grad_accum_steps=2",
        "deepspeed.zero_stage=3 train.precision=fp32 deepspeed.stage3_param_persistence_threshold=2000",
        "deepspeed.zero_stage=3 train.precision=bf16 deepspeed.zero3_init=false"],
    4: ["deepspeed.zero_stage=1 train.precision=bf16 train.grad_accum_steps=2", "deepspeed.zero_stage=2 train.precision=fp32",
        "deepspeed.zero_stage=3 train.precision=bf16 deepspeed.stage3_param_persistence_threshold=2000"],
}


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 4])
def test_model_state_bytes_per_rank_equal_what_the_engine_allocates(world, tmp_path):
    cases = [TINY + c.split() for c in CASES[world]]
    run_torchrun_script(Path(__file__).resolve().parent / "_memory_plan_ranks.py", [str(tmp_path), json.dumps(cases)],
                        nproc=world, timeout=900)
    wrong = []
    for rank in range(world):
        for got in json.loads((tmp_path / f"rank{rank}.json").read_text())["results"]:
            p = Planner(load_config(None, got["overrides"], world_size=world), target="cpu")
            s = model_states(p.layout(world), p.groups, world, rank)
            buffers = p.activations(p.cfg.train.micro_batch_size).model_buffers
            want = {"after_backward": s.after_backward + buffers, "after_step": s.after_step + buffers}
            have = {k: got[k] for k in want}
            if have != want:
                wrong.append(f"rank {rank} {' '.join(got['overrides'][len(TINY):])}: engine {have}, plan {want}")
    assert not wrong, "\n".join(wrong)


# --------------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("checkpointing", ["none", "every_n"])
def test_trace_on_fake_tensors_equals_the_same_step_on_real_ones(checkpointing):
    """The fake-tensor trace against one real CPU forward/backward of the same model: the same
    bookkeeping on real tensors gives the same peak (fake tensors take the same kernels and
    recompute the same blocks), and the C heap (glibc's mallinfo2, sampled after every operator)
    holds at least that and not much more (Python objects, allocator headers)."""
    from pretrain.model import Transformer

    cfg = tiny("model.loss_chunk_size=16", f"model.activation_checkpointing={checkpointing}")
    traced = trace(cfg.model, 3, 32, torch.float32, target="cpu")
    model = Transformer(cfg.model)
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    ids = torch.randint(0, 301, (3, 32))
    real = LiveBytes()
    real.ignore([*model.parameters(), *(t for m in model.modules() for t in vars(m).get("_rope_tables", ()))])
    with real:
        model(input_ids=ids, labels=ids).backward()
    heap = _HeapPeak()
    with heap:
        model(input_ids=ids, labels=ids).backward()
    assert real.peak == traced.peak
    assert traced.peak <= heap.peak <= 1.5 * traced.peak


class _HeapPeak(TorchDispatchMode):
    """Peak of the C heap in use (glibc mallinfo2: small blocks + mmapped ones) after each op."""

    def __init__(self):
        super().__init__()
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "mallinfo2"):
            pytest.skip("needs glibc >= 2.33 (mallinfo2)")

        class MallInfo(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keepcost")]

        libc.mallinfo2.restype = MallInfo
        self._info = libc.mallinfo2
        self.base, self.peak = self._used(), 0

    def _used(self) -> int:
        m = self._info()
        return m.uordblks + m.hblkhd

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self._used() - self.base)
        return out


def test_checkpointing_keeps_less_and_activations_grow_linearly_with_the_micro_batch():
    m = tiny("model.loss_chunk_size=16").model
    none = [trace(m, b, 32, torch.bfloat16, target="cpu").peak for b in (2, 3, 4)]
    full = trace(tiny("model.loss_chunk_size=16", "model.activation_checkpointing=full").model, 2, 32, torch.bfloat16,
                 target="cpu").peak
    assert full < none[0]
    assert none[2] - none[1] == none[1] - none[0] > 0


def test_cuda_trace_keeps_what_the_fused_rmsnorm_keeps():
    """CUDA's fused RMSNorm keeps its input and the inverse RMS; the CPU decomposition keeps two
    fp32 copies of the input instead. The GPU trace must use the former."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from pretrain.ops import RMSNorm

    def saved_bytes(cuda: bool) -> int:
        saved = []
        with FakeTensorMode():
            norm = RMSNorm(64)
            if cuda:
                run_cuda_kernels(norm)
            x = torch.empty(4, 128, 64, dtype=torch.bfloat16, requires_grad=True)
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
                norm(x)
        return sum({t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in saved}.values())

    x_bytes, rstd_bytes, weight_bytes = 4 * 128 * 64 * 2, 4 * 128 * 4, 64 * 2
    assert saved_bytes(cuda=True) == x_bytes + rstd_bytes + weight_bytes
    assert saved_bytes(cuda=False) >= 2 * 4 * 128 * 64 * 4  # two fp32 copies of the input


def test_live_bytes_count_views_once_and_frees():
    tracker = LiveBytes()
    with tracker:
        a = torch.empty(1000)
        b = a[:10].view(2, 5)  # a view: no new memory
        del a, b
        c = torch.empty(10)
    assert (tracker.peak, tracker.live) == (4000, 40)
    del c


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


def test_largest_micro_batch_fits_and_the_next_does_not():
    planner = Planner(tiny("model.loss_chunk_size=16", "deepspeed.zero_stage=1"), target="cpu")
    states = model_states(planner.layout(2), planner.groups, 2)
    memory = planner.phases(states, planner.activations(2))["forward_backward"] + 5 * (
        planner.activations(3).peak - planner.activations(2).peak)
    best = planner.max_micro_batch(states, memory)

    def peak(mb: int) -> int:
        return max(planner.phases(states, trace(planner.cfg.model, mb, 32, torch.bfloat16, target="cpu")).values())

    assert best >= 6 and peak(best) <= memory < peak(best + 1)
    assert planner.max_micro_batch(states, planner.phases(states, planner.activations(2))["step"] - 1) == 0


def test_peak_is_the_largest_phase_and_the_plan_shrinks_with_zero3_ranks():
    planner = Planner(tiny("deepspeed.zero_stage=3", "deepspeed.stage3_param_persistence_threshold=0"), target="cpu")
    one, eight = (planner.plan(n, 10 * GIB, find_max_micro_batch=False) for n in (1, 8))
    assert one.total_bytes == max(one.phases.values()) and one.fits
    assert eight.states.params < one.states.params and eight.states.optimizer < one.states.optimizer
    assert not planner.plan(1, one.total_bytes - 1, find_max_micro_batch=False).fits


def test_collective_volume_per_step():
    n, f = 1000, 3 / 4  # 1000 parameters over 4 ranks
    assert collectives(0, n, 4, 2, 2, 1, 0.0).total == round(2 * f * n * 2)  # gradient all-reduce
    assert collectives(1, n, 4, 2, 2, 4, 0.0).total == round(2 * f * n * 2)  # once per step
    assert collectives(2, n, 4, 2, 2, 4, 0.0).gradient_bytes == round(4 * f * n * 2)  # every micro-batch
    z3 = collectives(3, n, 4, 2, 2, 2, 1.0)  # gathers for forward, recompute and backward
    assert (z3.gradient_bytes, z3.parameter_bytes) == (round(2 * f * n * 2), round(2 * 3 * f * n * 2))
    assert collectives(3, n, 1, 2, 2, 1, 1.0).total == 0


def test_compute_time_from_a_one_gpu_bench():
    cfg = tiny("train.micro_batch_size=4", "train.grad_accum_steps=2")
    bench = {"step_time_s_median": 0.5, "tokens_per_step": 1000, "world_size": 1, "params": 123, "seq_len": 32}
    assert compute_time_s(cfg, bench) == pytest.approx(4 * 2 * 32 * 0.5 / 1000)
    check_bench(bench, cfg, 123, "b.json")
    with pytest.raises(UserError, match="b.json: benched a model of 123 parameters"):
        check_bench(bench, cfg, 124, "b.json")
    with pytest.raises(UserError, match="one-GPU bench"):
        check_bench({**bench, "world_size": 2}, cfg, 123, "b.json")


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env_cmd = [sys.executable, "-m", "pretrain", *args]
    return subprocess.run(env_cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_plan_command_prints_the_table_and_one_json_object_last(tmp_path):
    bench = tmp_path / "bench.json"
    params = Planner(tiny(), target="cuda").n_params
    bench.write_text(json.dumps({"step_time_s_median": 0.01, "tokens_per_step": 64, "world_size": 1, "params": params,
                                 "seq_len": 32}) + "\n")
    p = _run("plan", str(REPO / "configs/demo.yaml"), *TINY, "--gpus", "1,2,16", "--gpu-memory-gib", "1",
             "--bench-json", str(bench), "--bus-bandwidth-gbs", "10")
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.strip().splitlines()
    out = json.loads(lines[-1])
    assert [x["gpus"] for x in out["plans"]] == [1, 2, 16] and out["params"] == params
    for x in out["plans"]:
        assert x["fits"] == (x["total_bytes"] <= GIB) and x["total_bytes"] == max(x["phases"].values())
        assert x["max_micro_batch"] >= 1 and x["step_time_s"] is not None
    assert out["plans"][0]["comm_bytes"] == 0 < out["plans"][1]["comm_bytes"]
    assert any(line.startswith("PEAK per GPU") for line in lines)


def test_plan_command_rejects_gpu_counts_it_cannot_plan():
    p = _run("plan", str(REPO / "configs/demo.yaml"), "--gpus", "0,8", timeout=120)
    assert p.returncode == 2 and "argument --gpus: '0,8'" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_plan_of_the_7b_config_at_four_gpu_counts():
    """Never materialises the 7B parameters (the bar: under a minute on a 2-core CPU)."""
    p = _run("plan", str(REPO / "configs/bench/gpu_7b.yaml"), "--gpus", "1,8,64,512", "--gpu-memory-gib", "80")
    assert p.returncode == 0, p.stderr[-3000:]
    plans = json.loads(p.stdout.strip().splitlines()[-1])["plans"]
    one, eight = plans[0], plans[1]
    # ZeRO-3 on one 80 GiB GPU: bf16 weights and gradients plus fp32 master and moments alone
    # are 16 bytes per parameter (~100 GiB).
    assert not one["fits"] and one["max_micro_batch"] == 0
    assert one["params_bytes"] + one["grads_bytes"] + one["optimizer_bytes"] > 16 * 6.7e9 * 0.99
    assert eight["fits"] and eight["optimizer_bytes"] * 8 == pytest.approx(one["optimizer_bytes"], rel=1e-3)
    assert all(a["max_micro_batch"] <= b["max_micro_batch"] for a, b in zip(plans, plans[1:], strict=False))


# --------------------------------------------------------------------------------------------
# `pretrain train`'s start-up check
# --------------------------------------------------------------------------------------------


def test_train_refuses_a_config_that_cannot_fit_with_one_line_naming_the_fixes():
    demo = REPO / "configs/demo.yaml"
    cfg = resolve_precision(load_config(demo, TINY), "cpu")  # as train resolves it on this machine
    memory = f"train.device_memory_gib={0.93 * Planner(cfg, target='cpu').plan(1, 1).total_bytes / GIB!r}"
    p = _run("train", str(demo), *TINY, memory, "run.dir=/nonexistent/x", timeout=300)
    assert p.returncode == 2, p.stderr[-3000:]
    error = [line for line in p.stderr.splitlines() if line.startswith("error: memory plan")]
    assert len(error) == 1 and "GiB short" in error[0] and "train.ignore_memory_plan=true" in error[0], p.stderr[-2000:]
    fixes = error[0].split("would fit: ")[1].split("; or set")[0].split(" | ")
    assert fixes
    for fix in fixes:  # every suggested setting does make it fit
        settings = {}
        for item in fix.split():
            key, value = item.split("=")
            settings[key] = {"true": True}.get(value, int(value) if value.isdigit() else value)
        check_memory_plan(with_settings(load_config(demo, [*TINY, memory]), settings))


def test_memory_check_is_skipped_when_asked_and_on_cpu_without_a_memory_size(caplog):
    with caplog.at_level(logging.INFO, logger="pretrain.plan.check"):
        check_memory_plan(tiny("train.device_memory_gib=0.0001", "train.ignore_memory_plan=true"))
        check_memory_plan(tiny())
    assert "train.ignore_memory_plan=true" in caplog.text and "not checked on CPU" in caplog.text
    with pytest.raises(UserError, match="memory plan"):
        check_memory_plan(tiny("train.device_memory_gib=0.0001"))
