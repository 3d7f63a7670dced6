import logging

import pytest
import torch

from pretrain import attention as A
from pretrain.config import ModelConfig
from pretrain.errors import UserError
from pretrain.model import Transformer

CPU_BACKENDS = ["sdpa", "eager"]


def _qkv(B=2, T=24, H=4, Hkv=2, hd=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, hd, generator=g).to(dtype)
    k = torch.randn(B, T, Hkv, hd, generator=g).to(dtype)
    v = torch.randn(B, T, Hkv, hd, generator=g).to(dtype)
    return q, k, v


def _doc_ids(B=2, T=24):
    d = torch.zeros(B, T, dtype=torch.long)
    d[0, 7:] = 1
    d[0, 15:] = 2
    d[1, 20:] = 1
    return d


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("doc_masking", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("hkv", [4, 2, 1])
def test_backend_equals_eager(backend, doc_masking, dtype, tol, hkv):
    q, k, v = _qkv(Hkv=hkv, dtype=dtype)
    mask = A.document_mask(backend, _doc_ids()) if doc_masking else A.CAUSAL
    ref_mask = A.document_mask("eager", _doc_ids()) if doc_masking else A.CAUSAL
    out = A.attention(q, k, v, backend, mask)
    ref = A.eager_attention(q.float(), k.float(), v.float(), ref_mask)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


def test_eager_is_textbook_attention():
    q, k, v = _qkv(B=1, T=5, H=1, Hkv=1, hd=4)
    out = A.eager_attention(q, k, v, A.CAUSAL)
    for t in range(5):
        s = (k[0, : t + 1, 0] @ q[0, t, 0]) / 2.0
        expect = torch.softmax(s, 0) @ v[0, : t + 1, 0]
        torch.testing.assert_close(out[0, t, 0], expect)


def test_document_mask_dense_is_block_diagonal_causal():
    d = _doc_ids()
    m = A.document_mask("sdpa", d)
    assert m.kind == "dense" and m.dense.shape == (2, 1, 24, 24)
    dense = m.dense[:, 0]
    for b in range(2):
        for i in range(24):
            for j in range(24):
                assert bool(dense[b, i, j]) == (j <= i and bool(d[b, i] == d[b, j]))


def test_document_mask_varlen_cu_seqlens():
    m = A.document_mask("flash_attn", _doc_ids())  # built with plain torch, no flash-attn needed
    assert m.kind == "varlen"
    assert m.cu_seqlens.tolist() == [0, 7, 15, 24, 44, 48]
    assert m.cu_seqlens.dtype == torch.int32 and m.max_seqlen == 20


def test_single_document_rows_use_plain_causal():
    assert A.document_mask("sdpa", torch.zeros(3, 10, dtype=torch.long)) is A.CAUSAL


def test_offset_causal_mask_for_kv_cache():
    q, k, v = _qkv(B=1, T=10, H=2, Hkv=2)
    full = A.eager_attention(q, k, v, A.CAUSAL)
    # last 4 queries against all 10 keys (6 cached) equal the last 4 rows of the full result
    m = A.offset_causal_mask(4, 10, q.device)
    part = A.attention(q[:, 6:], k, v, "sdpa", m)
    torch.testing.assert_close(part, full[:, 6:], rtol=1e-5, atol=1e-5)
    assert A.offset_causal_mask(1, 10, q.device).kind == "none"


def test_auto_resolves_to_sdpa_on_cpu_and_logs_once(caplog):
    A._logged.clear()
    with caplog.at_level(logging.INFO, logger="pretrain.attention"):
        for _ in range(3):
            assert A.resolve_backend("auto", torch.device("cpu"), torch.bfloat16, True, 1024) == "sdpa"
    assert sum("attention backend" in r.message for r in caplog.records) == 1
    assert A.resolve_backend("auto", torch.device("cpu"), torch.bfloat16, False, 256) == "eager"
    assert A.resolve_backend("auto", torch.device("cpu"), torch.float32, False, 256) == "sdpa"
    assert A.resolve_backend("sdpa", torch.device("cpu"), torch.bfloat16, False, 256) == "sdpa"


@pytest.mark.skipif(A.flash_attn_available(), reason="flash-attn is usable here")
def test_flash_attn_requested_where_missing_is_a_clear_error():
    with pytest.raises(UserError, match=r"model.attention=flash_attn"):
        Transformer(ModelConfig(vocab_size=64, n_layers=1, n_heads=2, d_model=16, attention="flash_attn"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")
def test_flex_on_cpu_is_a_clear_error():
    with pytest.raises(UserError, match=r"model.attention=flex"):
        A.check_backend("flex")


def test_flash_attn_in_fp32_is_a_clear_error():
    with pytest.raises(UserError, match=r"flash_attn needs bf16 or fp16"):
        A.resolve_backend("flash_attn", torch.device("cuda"), torch.float32, False, 128)
