"""The device-side optimizer step: clip and skip inside fused AdamW, the rate as a device tensor."""

import pytest
import torch

from pretrain.bench.dispatch_count import DispatchCounter
from pretrain.optimizer import GuardedAdamW, LRSchedule, StepGuard


def _params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3, 2))]


def _guarded(params, clip=1.0, rate=lambda i: 1.0, horizon=10):
    guard = StepGuard(clip, "cpu")
    opt = GuardedAdamW([{"params": params[:1], "weight_decay": 0.1}, {"params": params[1:], "weight_decay": 0.0}],
                       guard, owns_norm=True, lr=0.01)
    return opt, LRSchedule(opt, rate, 0.01, horizon, guard, "cpu")


def _set_grads(params, scale):
    for p in params:
        p.grad = torch.full_like(p, 0.5 * scale)


def test_nonfinite_gradient_skips_the_update_on_the_device_without_a_host_sync():
    params = _params()
    opt, sched = _guarded(params)
    _set_grads(params, 1.0)
    opt.step()
    sched.step()
    before = [p.detach().clone() for p in params]
    state = {k: v.clone() for k, v in opt.state[params[0]].items()}
    _set_grads(params, 1.0)
    params[1].grad[0, 0] = float("nan")
    with DispatchCounter() as c:
        opt.step()
        sched.step()
    assert c.syncs == 0, c.sync_names  # the decision never reaches the host
    assert all(torch.equal(b, p.detach()) for b, p in zip(before, params, strict=True))
    assert all(torch.equal(v, opt.state[params[0]][k]) for k, v in state.items())  # moments and step count too
    assert opt.guard.found_inf.item() == 1.0 and not torch.isfinite(opt.guard.norm)
    assert int(sched.applied) == 1  # the skipped update does not advance the schedule


def test_clipping_in_the_kernel_matches_adamw_on_clipped_gradients():
    """Bitwise: the clip divisor max(1, (norm + 1e-6) / clip) that DeepSpeed applies, here inside the kernel."""
    ours, ref = _params(), _params()
    opt, _ = _guarded(ours, clip=0.5)
    plain = torch.optim.AdamW([{"params": ref[:1], "weight_decay": 0.1}, {"params": ref[1:], "weight_decay": 0.0}],
                              lr=0.01, fused=True)
    for scale in (4.0, 0.01, 3.0):  # clipped, unclipped, clipped
        _set_grads(ours, scale)
        _set_grads(ref, scale)
        norm = torch.stack([g.grad.double().norm() for g in ref]).square().sum().sqrt().float()  # fp64 sum
        for p in ref:
            p.grad /= torch.clamp((norm + 1e-6) / 0.5, min=1.0)
        opt.step()
        plain.step()
        assert torch.equal(opt.guard.norm, norm)
        assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(ours, ref, strict=True)), scale


def test_schedule_follows_applied_updates_and_resumes_from_either_checkpoint_format():
    rates = [1.0, 0.5, 0.25]
    params = _params()
    opt, sched = _guarded(params, rate=lambda i: rates[min(i, 2)], horizon=2)
    assert float(sched.current()) == pytest.approx(0.01)
    for skip in (False, True, False, False, False):
        _set_grads(params, float("nan") if skip else 1.0)
        opt.step()
        sched.step()
    assert int(sched.applied) == 4 and float(sched.current()) == pytest.approx(0.0025)  # flat past the horizon
    assert all(g["lr"] is sched.lr for g in opt.param_groups)
    assert sched.state_dict() == {"applied": 4}
    _, fresh = _guarded(_params(), rate=lambda i: rates[min(i, 2)], horizon=2)
    fresh.load_state_dict({"last_epoch": 1, "base_lrs": [0.01]})  # the former LambdaLR's state
    assert float(fresh.current()) == pytest.approx(0.005)
    host = LRSchedule(torch.optim.SGD(_params(), lr=0.01), lambda i: rates[min(i, 2)], 0.01, 2, None, "cpu")
    host.step()
    assert host.current() == pytest.approx(0.005) and host.state_dict() == {"applied": 1}
