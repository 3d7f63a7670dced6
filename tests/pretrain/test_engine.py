import pytest

from pretrain.config import load_config
from pretrain.engine import (
    deepspeed_config,
    param_groups,
    precision_path,
    schedule_horizon,
)
from pretrain.errors import ConfigError


def cfg_with(*overrides):
    return load_config(None, list(overrides), world_size=1)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_ds_config_batch_identity_and_stage_keys(stage):
    cfg = cfg_with(f"deepspeed.zero_stage={stage}", "train.micro_batch_size=4", "train.grad_accum_steps=3")
    conf = deepspeed_config(cfg, dp_world=8)
    assert conf["train_batch_size"] == 4 * 3 * 8
    assert conf["train_micro_batch_size_per_gpu"] == 4
    assert conf["gradient_accumulation_steps"] == 3
    z = conf["zero_optimization"]
    assert z["stage"] == stage
    assert ("allgather_bucket_size" in z) == (stage in (1, 2))
    assert ("stage3_param_persistence_threshold" in z) == (stage == 3)
    assert "offload_optimizer" not in z and "offload_param" not in z


def test_ds_config_precision_offload_and_clipping():
    cfg = cfg_with("train.precision=fp16", "deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true",
                   "deepspeed.offload_params=true", "deepspeed.fp16_initial_scale_power=12", "train.grad_clip=0.5")
    conf = deepspeed_config(cfg, dp_world=2, on_cuda=True)
    assert conf["fp16"]["enabled"] and not conf["bf16"]["enabled"]
    assert conf["fp16"]["loss_scale"] == 0 and conf["fp16"]["initial_scale_power"] == 12
    assert conf["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert conf["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert conf["gradient_clipping"] == 0.5
    bf = deepspeed_config(cfg_with("train.precision=bf16"), 1)
    assert bf["bf16"] == {"enabled": True, "check_grad_overflow": True} and not bf["fp16"]["enabled"]


@pytest.mark.parametrize("precision, stage, params, autocast, step", [
    ("bf16", 0, "fp32", "bf16", "device"),  # fp32 parameters are the masters: no DeepSpeed wrapper
    ("fp32", 0, "fp32", None, "device"),
    ("bf16", 1, "bf16", None, "device"),
    ("bf16", 2, "bf16", None, "device"),
    ("fp32", 2, "fp32", None, "device"),
    ("bf16", 3, "bf16", None, "deepspeed"),
    ("fp16", 1, "fp16", None, "deepspeed"),
])
def test_precision_path_decides_dtypes_and_who_steps(precision, stage, params, autocast, step):
    cfg = cfg_with(f"train.precision={precision}", f"deepspeed.zero_stage={stage}", "train.grad_clip=1.0")
    path = precision_path(cfg)
    assert (path.params, path.autocast, path.step) == (params, autocast, step)
    conf = deepspeed_config(cfg, 1)
    assert conf["bf16"]["enabled"] == (params == "bf16") and conf["fp16"]["enabled"] == (params == "fp16")
    assert ("torch_autocast" in conf) == (autocast is not None)
    assert conf["gradient_clipping"] == (0.0 if step == "device" else 1.0)  # the device step clips itself
    assert conf["timers"] == {"throughput": {"enabled": False}}  # it would synchronize twice per step


def test_model_state_bytes_follow_the_path():
    """What the memory planner reads: 16 bytes per parameter at ZeRO-0 bf16 (fp32 params, grads and
    Adam moments), and ZeRO-1's fp32 master and moments divided over the ranks."""
    zero0 = precision_path(cfg_with("train.precision=bf16", "deepspeed.zero_stage=0"))
    assert zero0.model_state_bytes_per_param(8) == {"params": 4, "grads": 4, "optim_states": 8}
    zero1 = precision_path(cfg_with("train.precision=bf16", "deepspeed.zero_stage=1"))
    assert zero1.model_state_bytes_per_param(4) == {"params": 2, "grads": 2, "optim_states": 2, "master": 1}
    zero3 = precision_path(cfg_with("train.precision=bf16", "deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true"))
    assert zero3.model_state_bytes_per_param(2) == {"params": 1, "grads": 1, "optim_states": 4, "master": 2}
    assert zero3.offloaded == ("optimizer",) and zero3.step == "deepspeed"


def test_extra_is_merged_last_and_nested():
    cfg = cfg_with("deepspeed.zero_stage=2", "deepspeed.extra.zero_optimization.round_robin_gradients=true",
                   "deepspeed.extra.wall_clock_breakdown=true")
    conf = deepspeed_config(cfg, 1)
    assert conf["zero_optimization"]["round_robin_gradients"] is True
    assert conf["zero_optimization"]["stage"] == 2  # siblings kept
    assert conf["wall_clock_breakdown"] is True


def test_extra_may_not_fork_the_batch_shape():
    with pytest.raises(ConfigError, match=r"deepspeed.extra must not set train_batch_size"):
        cfg_with("deepspeed.extra.train_batch_size=64")


def test_eval_needs_validation_data():
    with pytest.raises(ConfigError, match=r"train.eval_every > 0 needs validation data"):
        cfg_with("train.eval_every=10", "data.val_fraction=0")
    cfg_with("train.eval_every=0", "data.val_fraction=0")  # fine without evaluation


def test_offload_rules():
    with pytest.raises(ConfigError, match="offload_params=true requires deepspeed.zero_stage=3"):
        cfg_with("deepspeed.offload_params=true", "deepspeed.zero_stage=2")
    with pytest.raises(ConfigError, match="offload_optimizer=true requires deepspeed.zero_stage >= 1"):
        cfg_with("deepspeed.offload_optimizer=true", "deepspeed.zero_stage=0")


def test_schedule_horizon_follows_max_tokens():
    cfg = cfg_with("train.max_steps=1000", "train.micro_batch_size=2", "data.seq_len=100", "train.max_tokens=10000")
    assert schedule_horizon(cfg, dp_world=2) == 25  # 10000 tokens / (2 x 2 x 100) per step
    assert schedule_horizon(cfg_with("train.max_steps=1000"), 2) == 1000


def _tiny_model(*overrides):
    from pretrain.model import Transformer

    cfg = cfg_with("model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.vocab_size=256",
                   "model.max_seq_len=32", "data.seq_len=32", *overrides)
    return Transformer(cfg.model), cfg


def test_param_groups_default_no_decay_on_norms_and_embeddings():
    model, cfg = _tiny_model()
    groups, summary = param_groups(model, cfg.optim)
    decay, no_decay = ({id(p) for p in g["params"]} for g in groups)
    assert groups[0]["weight_decay"] == cfg.optim.weight_decay and groups[1]["weight_decay"] == 0.0
    assert id(model.embed.weight) in no_decay
    assert id(model.norm.weight) in no_decay and id(model.blocks[0].attn_norm.weight) in no_decay
    assert id(model.blocks[0].attn.wq.weight) in decay and id(model.lm_head.weight) in decay
    assert summary.decay + summary.no_decay == sum(p.numel() for p in model.parameters())
    assert len(decay | no_decay) == len(list(model.parameters()))


def test_param_groups_configurable_and_tied():
    model, cfg = _tiny_model("optim.decay_embeddings=true", "optim.decay_norms=true", "model.tie_embeddings=true")
    groups, summary = param_groups(model, cfg.optim)
    assert len(groups) == 1 and summary.no_decay == 0  # everything decays; empty group dropped
    assert sum(p.numel() for p in groups[0]["params"]) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("key, owner", [
    ("zero_optimization.stage=3", "deepspeed.zero_stage"),
    ("bf16.enabled=false", "train.precision"),
    ("gradient_clipping=5.0", "train.grad_clip"),
    ("optimizer.type=Adam", "the optim section"),
])
def test_extra_may_not_fork_a_setting_the_config_owns(key, owner):
    """A stage set only in extra would run ZeRO-3 while checkpoints record zero_stage=1."""
    with pytest.raises(ConfigError, match=rf"deepspeed.extra.{key.split('=')[0].split('.type')[0]} is derived from {owner}"):
        cfg_with(f"deepspeed.extra.{key}")
    cfg_with("deepspeed.extra.zero_optimization.round_robin_gradients=true")  # a key the config does not own


def test_model_init_context_only_under_zero3_with_zero3_init():
    import contextlib
    from types import SimpleNamespace

    from pretrain.engine import model_init_context

    info = SimpleNamespace(world_size=1, device="cpu")
    for over in (["deepspeed.zero_stage=2"], ["deepspeed.zero_stage=3", "deepspeed.zero3_init=false"]):
        assert isinstance(model_init_context(load_config(None, over), info), contextlib.nullcontext), over


@pytest.mark.slow
def test_zero3_init_builds_the_same_model_partitioned(tmp_path):
    """2 ranks: under deepspeed.zero.Init each rank holds half the parameters, and after gathering
    every parameter equals the one built whole from the same seed (our init survives partitioning)."""
    import json
    from pathlib import Path

    from _trainer_helpers import run_torchrun_script

    run_torchrun_script(Path(__file__).resolve().parent / "_zero3_init.py", [str(tmp_path)], timeout=240)
    rows = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in rows:
        assert r["partitioned"] and r["differ"] == [], r
        assert r["local"] == r["total"] // 2, r


def test_precision_auto_follows_native_bf16(monkeypatch, caplog):
    """auto -> bf16 only where bf16 matmuls run in hardware; an explicit bf16 on a CPU without it
    still runs, with a warning (its matmuls would take a reference GEMM, ~100x slower than fp32)."""
    import pretrain.engine as eng
    from pretrain.config import load_config

    auto = load_config(None, ["train.precision=auto"])
    monkeypatch.setattr(eng, "native_bf16", lambda accel: False)
    assert eng.resolve_precision(auto, "cpu").train.precision == "fp32"
    assert eng.resolve_precision(auto, "cuda").train.precision == "fp16"
    bf16 = load_config(None, ["train.precision=bf16"])
    with caplog.at_level("WARNING"):
        assert eng.resolve_precision(bf16, "cpu") is bf16
    assert "reference GEMM" in caplog.text
    monkeypatch.setattr(eng, "native_bf16", lambda accel: True)
    assert eng.resolve_precision(auto, "cpu").train.precision == "bf16"
    assert eng.resolve_precision(auto, "cuda").train.precision == "bf16"
    assert auto.train.precision == "auto"  # the caller's config is not mutated
