import json

import pytest

from pretrain.config import load_config
from pretrain.monitor import (
    LOSS_CURVE_FILE,
    METRICS_FILE,
    Monitor,
    Throughput,
    plot_loss_curve,
    read_metrics,
    resolve_wandb_mode,
)


def test_throughput_window_mfu_and_wait():
    t = Throughput(flops_per_token=1e6, peak_flops=1e10, world_size=2)
    t.update(global_tokens=4000, step_time=1.0, wait_time=0.01)
    t.update(global_tokens=4000, step_time=3.0, wait_time=0.03)
    s = t.summary()
    assert s["tokens_per_s"] == pytest.approx(2000)
    assert s["tokens_per_s_per_device"] == pytest.approx(1000)
    assert s["step_time_s"] == pytest.approx(2.0)
    assert s["mfu"] == pytest.approx(1000 * 1e6 / 1e10)
    assert s["loader_wait_frac"] == pytest.approx(0.01)
    t.reset()
    assert t.summary() == {}
    assert Throughput(1e6, None, 1).summary() == {}  # nothing recorded
    u = Throughput(1e6, None, 1)
    u.update(10, 1.0, 0.0)
    assert u.summary()["mfu"] is None  # unknown peak: no made-up MFU


def test_wandb_mode_auto(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert resolve_wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode("auto") == "online"
    assert resolve_wandb_mode("disabled") == "disabled"


def test_read_metrics_last_line_per_step_wins_and_survives_a_cut_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    rows = [
        {"kind": "train", "step": 1, "train/loss": 5.0},
        {"kind": "train", "step": 2, "train/loss": 4.0},
        {"kind": "eval", "step": 2, "val/loss": 4.5},
        {"kind": "train", "step": 2, "train/loss": 3.9},  # re-logged after a resume
    ]
    p.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"kind": "tra')
    train = read_metrics(p, "train")
    assert [(r["step"], r["train/loss"]) for r in train] == [(1, 5.0), (2, 3.9)]
    assert [r["step"] for r in read_metrics(p, "eval")] == [2]


def test_plot_loss_curve(tmp_path):
    p = tmp_path / "metrics.jsonl"
    assert plot_loss_curve(p, tmp_path / "x.png") is None
    p.write_text("\n".join(json.dumps({"kind": "train", "step": s, "train/loss": 8 - s / 10}) for s in range(1, 30))
                 + "\n" + json.dumps({"kind": "eval", "step": 20, "val/loss": 6.5}) + "\n")
    out = plot_loss_curve(p, tmp_path / "loss.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_monitor_rank0_writes_jsonl_other_ranks_nothing(tmp_path):
    cfg = load_config(None, ["wandb.mode=disabled", "train.progress_bar=false"])
    m1 = Monitor(cfg, rank=1, run_dir=tmp_path / "r1", start_step=0, wandb_run_id=None, total_steps=10)
    m1.log_train(1, {"train/loss": 1.0, "train/lr": 1e-3})
    m1.close()
    assert not (tmp_path / "r1").exists()
    m0 = Monitor(cfg, rank=0, run_dir=tmp_path / "r0", start_step=0, wandb_run_id=None, total_steps=10)
    m0.log_setup({"setup/params": 5})
    m0.log_train(1, {"train/loss": 2.0, "train/lr": 1e-3, "train/grad_norm": None})
    m0.log_eval(1, {"val/loss": 2.5, "val/ppl": 12.18})
    m0.close()
    lines = [json.loads(x) for x in (tmp_path / "r0" / "metrics.jsonl").read_text().splitlines()]
    assert [x["kind"] for x in lines] == ["setup", "train", "eval"]
    assert "train/grad_norm" not in lines[1]  # None values are left out, not written as null
    assert (tmp_path / "r0" / "loss_curve.png").is_file()


def test_metrics_file_starts_over_at_step_0_and_appends_on_resume(tmp_path):
    """A fresh start (resume=never overwrite=true, or a crash before the first checkpoint) must not
    mix the earlier attempt's rows into this run's curve; a resumed run keeps them."""
    cfg = load_config(None, ["wandb.mode=disabled", "train.progress_bar=false"])
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 9, "train/loss": 1.0}) + "\n")
    m = Monitor(cfg, rank=0, run_dir=tmp_path, start_step=0, wandb_run_id=None, total_steps=10)
    m.log_train(1, {"train/loss": 5.0, "train/lr": 1e-3})
    m.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl", "train")] == [1]
    m = Monitor(cfg, rank=0, run_dir=tmp_path, start_step=1, wandb_run_id=None, total_steps=10)
    m.log_train(2, {"train/loss": 4.0, "train/lr": 1e-3})
    m.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl", "train")] == [1, 2]


def test_nothing_is_written_once_the_run_directory_is_someone_elses(tmp_path):
    """``may_write`` (RunLease.still_ours in the trainer) turns False: no metrics line, no loss curve."""
    cfg = load_config(None, ["wandb.mode=disabled", "train.progress_bar=false"])
    ours = [True]
    m = Monitor(cfg, rank=0, run_dir=tmp_path, start_step=0, wandb_run_id=None, total_steps=10,
                may_write=lambda: ours[0])
    m.log_train(1, {"train/loss": 2.0, "train/lr": 1e-3})
    before = (tmp_path / METRICS_FILE).read_text()
    ours[0] = False
    m.log_train(2, {"train/loss": 1.0, "train/lr": 1e-3})
    m.log_eval(2, {"val/loss": 1.0, "val/ppl": 2.7})
    m.close()
    assert (tmp_path / METRICS_FILE).read_text() == before and not (tmp_path / LOSS_CURVE_FILE).exists()
    late = Monitor(cfg, rank=0, run_dir=tmp_path / "late", start_step=0, wandb_run_id=None, total_steps=10,
                   may_write=lambda: False)
    late.close()
    assert not (tmp_path / "late").exists()
