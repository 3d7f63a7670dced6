import pytest
import torch
import torch.nn.functional as F

from pretrain.ops import RMSNorm, apply_rope, chunked_cross_entropy, rope_cache, rotate_half, swiglu


def _ce_inputs(n=301, d=24, vocab=100, padded=128, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=dtype)
    w = torch.randn(padded, d, generator=g, dtype=dtype) * 0.5
    y = torch.randint(0, vocab, (n,), generator=g)
    y[::5] = -100
    return h, w, y


@pytest.mark.parametrize("chunk", [1, 64, 100, 4096])
def test_chunked_ce_value_and_grad_equal_cross_entropy_fp32(chunk):
    h, w, y = _ce_inputs()
    vocab = 100
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = chunked_cross_entropy(h1, w1, y, vocab, chunk)
    (2.5 * loss).backward()  # a non-unit upstream gradient must be honoured
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = F.cross_entropy(h2 @ w2[:vocab].t(), y, ignore_index=-100)
    (2.5 * ref).backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-6)
    assert w1.grad[vocab:].abs().max() == 0  # padding rows get no gradient


def test_padding_logits_never_win():
    h, w, y = _ce_inputs()
    w_huge = w.clone()
    w_huge[100:] = h.abs().max() * 100  # padding columns would dominate every softmax if used
    a = chunked_cross_entropy(h, w, y, 100, 64)
    b = chunked_cross_entropy(h, w_huge, y, 100, 64)
    torch.testing.assert_close(a, b)


def test_chunked_ce_bf16_autocast_close_to_reference():
    h, w, y = _ce_inputs()
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_cross_entropy(h1, w1, y, 100, 64)
    loss.backward()
    assert w1.grad.dtype == torch.float32  # fp32 master weight keeps an fp32 gradient
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = F.cross_entropy(h2 @ w2[:100].t(), y, ignore_index=-100)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-2, atol=0)
    rel = (h1.grad - h2.grad).norm() / h2.grad.norm()
    assert rel < 1e-2


def test_chunked_ce_pure_bf16_grads_in_param_dtype():
    h, w, y = _ce_inputs(dtype=torch.bfloat16)
    h.requires_grad_()
    w.requires_grad_()
    loss = chunked_cross_entropy(h, w, y, 100, 64)
    loss.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.bfloat16
    ref = F.cross_entropy((h.detach() @ w.detach()[:100].t()).float(), y)
    torch.testing.assert_close(loss, ref, rtol=1e-2, atol=0)


def test_chunked_ce_all_ignored_is_zero_not_nan():
    h, w, y = _ce_inputs()
    h.requires_grad_()
    loss = chunked_cross_entropy(h, w, torch.full_like(y, -100), 100, 64)
    loss.backward()
    assert loss.item() == 0.0 and h.grad.abs().max() == 0


def test_chunked_ce_no_grad_path_matches():
    h, w, y = _ce_inputs()
    with torch.no_grad():
        a = chunked_cross_entropy(h, w, y, 100, 50)
    torch.testing.assert_close(a, F.cross_entropy(h @ w[:100].t(), y))


def test_rmsnorm_matches_formula():
    x = torch.randn(3, 5, 16)
    norm = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 16))
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), ref)


def test_swiglu():
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    torch.testing.assert_close(swiglu(a, b), a * torch.sigmoid(a) * b)


def test_rope_rotate_half_convention_and_relative_positions():
    hd = 8
    cos, sin = rope_cache(64, hd, 10000.0)
    # rotate_half pairs element i with i + hd/2 (Hugging Face Llama), not (2i, 2i+1).
    x = torch.arange(hd, dtype=torch.float32)
    torch.testing.assert_close(rotate_half(x), torch.tensor([-4.0, -5, -6, -7, 0, 1, 2, 3]))
    q, k = torch.randn(hd), torch.randn(hd)

    def rot(v, pos):
        return apply_rope(v, cos[pos], sin[pos])

    # The score depends only on the distance between positions, and norms are preserved.
    s1 = rot(q, 10) @ rot(k, 7)
    s2 = rot(q, 40) @ rot(k, 37)
    torch.testing.assert_close(s1, s2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rot(q, 13).norm(), q.norm())
    # Position 0 is the identity; the first pair rotates by exactly `pos` radians.
    torch.testing.assert_close(rot(q, 0), q)
    assert torch.isclose(cos[3, 0], torch.cos(torch.tensor(3.0)))


def test_eager_and_compile_target_softmax_grads_agree():
    from pretrain.ops import _softmax_grad, _softmax_grad_functional

    logits = torch.randn(33, 128)
    y = torch.randint(0, 100, (33, 1))
    a_lp, a_g = _softmax_grad(logits.clone(), y, 100)
    b_lp, b_g = _softmax_grad_functional(logits.clone(), y, 100)
    torch.testing.assert_close(a_lp, b_lp)
    torch.testing.assert_close(a_g, b_g)
    assert a_g[:, 100:].abs().max() == 0 and torch.allclose(a_g.sum(-1), torch.zeros(33), atol=1e-5)


@pytest.mark.slow
def test_compiled_chunked_ce_equals_cross_entropy():
    h, w, y = _ce_inputs()
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = chunked_cross_entropy(h1, w1, y, 100, 64, compiled=True)
    loss.backward()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = F.cross_entropy(h2 @ w2[:100].t(), y, ignore_index=-100)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-6)


def test_rmsnorm_bf16_statistics_in_fp32():
    x = torch.randn(4, 64) * 30
    w = torch.linspace(0.5, 1.5, 64)
    ref = (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w).to(torch.bfloat16)
    from pretrain.ops import rms_norm

    out = rms_norm(x.to(torch.bfloat16), w.to(torch.bfloat16), 1e-5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
