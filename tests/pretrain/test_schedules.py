import math

import pytest

from pretrain.schedules import lr_at, lr_multiplier

KW = dict(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)


def test_warmup_is_linear_and_reaches_peak():
    assert lr_at(0, **KW) == pytest.approx(0.1)
    assert lr_at(4, **KW) == pytest.approx(0.5)
    assert lr_at(9, **KW) == pytest.approx(1.0)


def test_cosine_from_peak_to_min():
    assert lr_at(10, **KW) == pytest.approx(1.0)
    assert lr_at(60, **KW) == pytest.approx(0.55)  # halfway: min + (peak - min) / 2
    assert lr_at(110, **KW) == pytest.approx(0.1)
    assert lr_at(10_000, **KW) == pytest.approx(0.1)  # stays at min past the end
    values = [lr_at(s, **KW) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_wsd_stable_then_linear_decay():
    kw = dict(KW, schedule="wsd", decay_fraction=0.2, max_steps=100)
    assert lr_at(50, **kw) == 1.0
    assert lr_at(79, **kw) == 1.0  # decay starts at 100 - 20 = 80
    assert lr_at(80, **kw) == pytest.approx(1.0)
    assert lr_at(90, **kw) == pytest.approx(0.55)
    assert lr_at(100, **kw) == pytest.approx(0.1)
    assert lr_at(500, **kw) == pytest.approx(0.1)


def test_wsd_decay_never_overlaps_warmup():
    kw = dict(lr=1.0, min_lr=0.0, warmup_steps=10, max_steps=12, schedule="wsd", decay_fraction=0.9)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(11, **kw) == pytest.approx(0.5)


def test_constant_and_no_warmup():
    kw = dict(KW, schedule="constant", warmup_steps=0)
    assert {lr_at(s, **kw) for s in (0, 50, 5000)} == {1.0}


def test_unknown_schedule_rejected():
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_at(0, **KW, schedule="linear")


def test_multiplier_matches_lr_at_and_drives_lambdalr():
    import torch

    from pretrain.config import OptimConfig

    o = OptimConfig(lr=2e-3, min_lr=2e-4, warmup_steps=5, schedule="cosine")
    f = lr_multiplier(o, max_steps=50)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=o.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
    seen = []
    for _ in range(60):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [lr_at(s, lr=2e-3, min_lr=2e-4, warmup_steps=5, max_steps=50) for s in range(60)]
    assert all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(seen, expected, strict=True))
