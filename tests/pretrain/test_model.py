import dataclasses
import gc
import math
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from pretrain.config import ModelConfig, load_config
from pretrain.model import (
    SELECTIVE_SAVE,
    Transformer,
    padded_vocab_size,
    param_count_formula,
    positions_from_doc_ids,
)

PRESETS = sorted((Path(__file__).resolve().parents[2] / "configs" / "model").glob("*.yaml"))


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=97, n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, max_seq_len=64, loss_chunk_size=16)
    base.update(kw)
    return ModelConfig(**base)


def _model(cfg: ModelConfig, seed=0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def test_contract_module_names_and_padded_vocab():
    m = _model(tiny())
    names = dict(m.named_parameters())
    assert m.embed.weight.shape == (128, 32)  # 97 padded up to a multiple of 64
    for key in ("attn_norm", "attn.wq", "attn.wk", "attn.wv", "attn.wo", "mlp_norm", "mlp.w_gate", "mlp.w_up", "mlp.w_down"):
        assert f"blocks.1.{key}.weight" in names
    assert "norm.weight" in names and "lm_head.weight" in names
    assert all(".bias" not in n for n in names)
    logits = m(torch.randint(0, 97, (2, 9)))
    assert logits.shape == (2, 9, 97)  # padding columns excluded
    tied = _model(tiny(tie_embeddings=True))
    assert tied.lm_head is None and "lm_head.weight" not in dict(tied.named_parameters())


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_param_count_matches_formula_for_every_preset(preset):
    cfg = load_config(preset).model
    with torch.device("meta"):
        m = Transformer(cfg)
    assert sum(p.numel() for p in m.parameters()) == param_count_formula(cfg)


def test_named_presets_have_their_advertised_size():
    sizes = {p.stem: param_count_formula(load_config(p).model) for p in PRESETS}
    assert 115e6 < sizes["125m"] < 135e6 and 330e6 < sizes["350m"] < 370e6
    assert 1.0e9 < sizes["1b"] < 1.2e9 and sizes["7b"] == 6_738_415_616  # Llama-2-7B exactly


def test_causality():
    m = _model(tiny())
    x = torch.randint(0, 97, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        a, b = m(x), m(y)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_doc_masking_second_document_equals_document_alone(backend):
    cfg = tiny(doc_masking=True, reset_positions=True, attention=backend)
    m = _model(cfg)
    doc_a, doc_b = torch.randint(0, 97, (1, 11)), torch.randint(0, 97, (1, 13))
    packed = torch.cat([doc_a, doc_b], dim=1)
    doc_ids = torch.tensor([[0] * 11 + [1] * 13])
    with torch.no_grad():
        packed_logits = m(packed, doc_ids=doc_ids)
        alone = m(doc_b)
        first_alone = m(doc_a)
    torch.testing.assert_close(packed_logits[:, 11:], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed_logits[:, :11], first_alone, rtol=1e-5, atol=1e-5)
    # Without document masking the second document does see the first.
    m.cfg = dataclasses.replace(cfg, doc_masking=False, reset_positions=False)
    with torch.no_grad():
        assert not torch.allclose(m(packed)[:, 11:], alone, atol=1e-3)


def test_positions_restart_at_documents():
    d = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 1, 1, 1, 1, 1]])
    assert positions_from_doc_ids(d).tolist() == [[0, 1, 2, 0, 1, 0], [0, 0, 1, 2, 3, 4]]


def _reference_mha(m: Transformer, x: torch.Tensor) -> torch.Tensor:
    """Plain multi-head attention block stack written out per head (the GQA reference)."""
    from pretrain.ops import apply_rope

    cfg = m.cfg
    H, hd = cfg.n_heads, cfg.d_model // cfg.n_heads
    T = x.shape[1]
    cos, sin = m._rope_tables
    cos, sin = cos[:T], sin[:T]
    h = m.embed(x)
    for blk in m.blocks:
        a = blk.attn_norm(h)
        q = a @ blk.attn.wq.weight.t()
        k = a @ blk.attn.wk.weight.t()
        v = a @ blk.attn.wv.weight.t()
        heads = []
        for i in range(H):
            qi = apply_rope(q[..., i * hd : (i + 1) * hd], cos, sin)
            ki = apply_rope(k[..., i * hd : (i + 1) * hd], cos, sin)
            s = qi @ ki.transpose(-1, -2) / math.sqrt(hd)
            s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
            heads.append(torch.softmax(s, -1) @ v[..., i * hd : (i + 1) * hd])
        h = h + torch.cat(heads, -1) @ blk.attn.wo.weight.t()
        h = h + blk.mlp(blk.mlp_norm(h))
    return m.norm(h) @ m.lm_head.weight[: cfg.vocab_size].t()


def test_gqa_with_all_kv_heads_equals_plain_multi_head():
    m = _model(tiny(n_kv_heads=4))
    x = torch.randint(0, 97, (2, 15))
    with torch.no_grad():
        torch.testing.assert_close(m(x), _reference_mha(m, x), rtol=1e-5, atol=1e-5)


def test_gqa_equals_multi_head_with_shared_kv_weights():
    """n_kv_heads=2 for 4 query heads == MHA whose k/v heads are copies for each group."""
    gqa = _model(tiny(n_kv_heads=2))
    mha = Transformer(tiny(n_kv_heads=4)).eval()
    sd = gqa.state_dict()
    hd = 8
    for i in range(2):
        for w in ("wk", "wv"):
            key = f"blocks.{i}.attn.{w}.weight"
            heads = sd[key].view(2, hd, 32)
            sd[key] = heads.repeat_interleave(2, dim=0).reshape(4 * hd, 32)  # query heads 0,1 -> kv 0
    mha.load_state_dict(sd)
    x = torch.randint(0, 97, (2, 15))
    with torch.no_grad():
        torch.testing.assert_close(gqa(x), mha(x), rtol=1e-5, atol=1e-5)


def test_loss_equals_cross_entropy_of_logits():
    m = _model(tiny())
    x = torch.randint(0, 97, (2, 20))
    y = torch.randint(0, 97, (2, 20))
    y[0, :5] = -100
    with torch.no_grad():
        loss = m(x, labels=y)
        ref = F.cross_entropy(m(x).reshape(-1, 97), y.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    assert abs(loss.item() - math.log(97)) < 0.5  # near-uniform at init


def _grads(cfg, x, y, **kw):
    m = _model(cfg).train()
    m(x, labels=y, **kw).backward()
    return {n: p.grad.clone() for n, p in m.named_parameters()}


@pytest.mark.parametrize("mode", ["full", "every_n", "selective"])
@pytest.mark.parametrize("doc_masking", [False, True])
def test_activation_checkpointing_gives_identical_grads(mode, doc_masking):
    x, y = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    doc_ids = torch.tensor([[0] * 5 + [1] * 11, [0] * 16])
    extra = dict(doc_masking=doc_masking, reset_positions=doc_masking)
    ref = _grads(tiny(n_layers=3, **extra), x, y, doc_ids=doc_ids)
    got = _grads(tiny(n_layers=3, activation_checkpointing=mode, checkpoint_every_n=2, **extra), x, y, doc_ids=doc_ids)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-7, msg=n)


class _HeldStorages(TorchDispatchMode):
    """Records every storage an op outputs (weakly: whether it outlives the forward is the point),
    and which of them SELECTIVE_SAVE ops produced inside a Block (``in_block``, set by hooks)."""

    def __init__(self):
        super().__init__()
        self.outputs: list[tuple] = []  # (weakref to storage, bytes, a SELECTIVE_SAVE output in a block)
        self.in_block = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                self.outputs.append((weakref.ref(st), st.nbytes(), self.in_block and func in SELECTIVE_SAVE))
        return out

    def alive(self, exclude: set[int], saved_only: bool = False) -> dict[int, int]:
        """data_ptr -> bytes of the recorded storages still alive (an address can be reused after a
        free, so liveness is decided per recorded storage, then deduplicated)."""
        out = {}
        for ref, n, saved in self.outputs:
            st = ref()
            if st is not None and st.data_ptr() not in exclude and (saved or not saved_only):
                out[st.data_ptr()] = n
        return out


def _activation_bytes(mode: str, attention: str):
    """Bytes the autograd graph holds after forward (every op output still alive, parameters and
    the loss excluded): what activation checkpointing is for, counted exactly on the CPU."""
    m = _model(tiny(n_layers=2, d_model=64, n_kv_heads=4, attention=attention, activation_checkpointing=mode)).train()
    x, y = torch.randint(0, 97, (4, 64), generator=torch.Generator().manual_seed(1)), torch.zeros(4, 64, dtype=torch.long)
    held = _HeldStorages()
    for block in m.blocks:
        block.register_forward_pre_hook(lambda *_: setattr(held, "in_block", True))
        block.register_forward_hook(lambda *_: setattr(held, "in_block", False))
    with held:
        loss = m(x, labels=y)
    gc.collect()
    exclude = {p.untyped_storage().data_ptr() for p in m.parameters()} | {loss.untyped_storage().data_ptr()}
    alive, saved = held.alive(exclude), held.alive(exclude, saved_only=True)
    n_saved_outputs = sum(s for _, _, s in held.outputs)
    loss.backward()
    return sum(alive.values()), saved, n_saved_outputs, {n: p.grad for n, p in m.named_parameters()}


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_selective_checkpointing_keeps_exactly_the_matmul_and_attention_outputs(attention):
    """selective = full + the outputs of SELECTIVE_SAVE inside the blocks, byte for byte; everything
    else (norms, RoPE, SwiGLU, casts) is recomputed, with gradients identical to no checkpointing."""
    none, _, _, ref = _activation_bytes("none", attention)
    full, _, _, _ = _activation_bytes("full", attention)
    selective, saved, n_saved_outputs, grads = _activation_bytes("selective", attention)
    assert full < selective < none
    assert len(saved) == n_saved_outputs > 0  # every output of a SELECTIVE_SAVE op outlived the forward
    assert selective - full == sum(saved.values())  # and nothing else did
    if attention == "sdpa":  # the fused kernel's output is kept; eager's [T x T] scores are recomputed
        assert selective < 0.7 * none, (selective, none)
    for n in ref:
        assert torch.equal(grads[n], ref[n]), n


def test_given_position_ids_equal_derived_ones():
    m = _model(tiny(doc_masking=True, reset_positions=True, init_std=0.2))  # peaked attention
    x = torch.randint(0, 97, (2, 12))
    doc_ids = torch.tensor([[0] * 4 + [1] * 8, [0] * 7 + [1] * 5])
    with torch.no_grad():
        derived = m(x, doc_ids=doc_ids)
        given = m(x, doc_ids=doc_ids, position_ids=positions_from_doc_ids(doc_ids))
        shifted = m(x, doc_ids=doc_ids, position_ids=positions_from_doc_ids(doc_ids) + 3)
        scrambled = m(x, doc_ids=doc_ids, position_ids=positions_from_doc_ids(doc_ids).flip(-1))
    torch.testing.assert_close(given, derived)
    torch.testing.assert_close(shifted, derived, rtol=1e-4, atol=1e-4)  # RoPE is relative
    assert not torch.allclose(scrambled, derived, atol=1e-3)  # positions really reach RoPE


def test_init_scales_residual_projections():
    cfg = tiny(n_layers=8, d_model=256, n_heads=4, n_kv_heads=4, init_std=0.02)
    m = Transformer(cfg)
    assert abs(m.blocks[0].attn.wq.weight.std().item() - 0.02) < 2e-3
    assert abs(m.blocks[0].mlp.w_down.weight.std().item() - 0.02 / math.sqrt(16)) < 5e-4
    assert torch.all(m.norm.weight == 1)


def test_bf16_autocast_and_pure_bf16_close_to_fp32():
    m = _model(tiny())
    x, y = torch.randint(0, 97, (2, 20)), torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        ref = m(x, labels=y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = m(x, labels=y)
        pure = m.to(torch.bfloat16)(x, labels=y)
    torch.testing.assert_close(auto, ref, rtol=1e-2, atol=0)
    torch.testing.assert_close(pure, ref, rtol=1e-2, atol=0)
    assert m._rope_tables[0].dtype == torch.float32  # .to(bf16) must not degrade the RoPE table


def test_padded_vocab_size():
    assert padded_vocab_size(tiny(vocab_size=50257)) == 50304
    assert padded_vocab_size(tiny(vocab_size=128)) == 128


@pytest.mark.slow
def test_compiled_blocks_match_eager_loss_and_grads():
    x, y = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    ref = _grads(tiny(), x, y)
    got = _grads(tiny(compile=True), x, y)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-6, msg=n)


def test_loss_chunk_size_null_picks_the_device_default(monkeypatch):
    """null = 512-token chunks on CPU (4096 on CUDA, checked in test_gpu.py); an explicit size wins."""
    import pretrain.model as model_mod

    seen = []
    real = model_mod.chunked_cross_entropy
    monkeypatch.setattr(model_mod, "chunked_cross_entropy",
                        lambda *a, **k: seen.append(a[4]) or real(*a, **k))
    idx = torch.randint(0, 97, (2, 9))
    loss_auto = _model(tiny(loss_chunk_size=None))(idx, labels=idx)
    loss_ref = _model(tiny(loss_chunk_size=0))(idx, labels=idx)
    assert seen == [model_mod.LOSS_CHUNK_CPU, 0] and model_mod.LOSS_CHUNK_CPU == 512
    torch.testing.assert_close(loss_auto, loss_ref)
