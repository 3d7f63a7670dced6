import pytest
import torch

from pretrain.config import ModelConfig
from pretrain.model import KVCache, Transformer
from pretrain.sampling import filter_logits, generate


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=61, n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, max_seq_len=64, init_std=0.2)
    return Transformer(cfg).eval()


def _greedy_full(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_kv_cache_greedy_equals_full_forward(model):
    prompt = [3, 17, 5, 42, 8]
    assert generate(model, prompt, max_new_tokens=20, temperature=0) == _greedy_full(model, prompt, 20)


def test_kv_cache_logits_close_to_full_forward(model):
    ids = torch.randint(0, 61, (2, 24))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.cfg, 2, 24, "cpu", torch.float32)
        parts = [model(ids[:, :7], cache=cache), model(ids[:, 7:10], cache=cache)]  # multi-token step
        parts += [model(ids[:, t : t + 1], cache=cache) for t in range(10, 24)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_seeded_sampling_is_reproducible(model):
    a = generate(model, [1, 2, 3], max_new_tokens=30, temperature=1.5, seed=7)
    b = generate(model, [1, 2, 3], max_new_tokens=30, temperature=1.5, seed=7)
    c = generate(model, [1, 2, 3], max_new_tokens=30, temperature=1.5, seed=8)
    assert a == b and a != c and len(a) == 30


def test_top_k_one_is_greedy(model):
    prompt = [9, 9, 4]
    assert generate(model, prompt, 12, temperature=1.0, top_k=1, seed=3) == _greedy_full(model, prompt, 12)


def test_sampled_tokens_respect_top_k(model):
    prompt = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        allowed = set(torch.topk(model(prompt)[0, -1], 3).indices.tolist())
    for seed in range(10):
        assert generate(model, [5, 6, 7], 1, temperature=5.0, top_k=3, seed=seed)[0] in allowed


def test_eos_stops_generation(model):
    first = generate(model, [1, 2], 1, temperature=0)[0]
    assert generate(model, [1, 2], 10, temperature=0, eos_id=first) == [first]


def test_filter_logits_top_p_and_top_k():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    kept = filter_logits(logits, top_p=0.8).isfinite().tolist()
    assert kept == [True, True, False, False]  # 0.5 + 0.3 reaches 0.8
    assert filter_logits(logits, top_p=0.81).isfinite().tolist() == [True, True, True, False]
    assert filter_logits(logits, top_p=0.1).isfinite().tolist() == [True, False, False, False]
    assert filter_logits(logits[[2, 0, 3, 1]], top_k=2).isfinite().tolist() == [False, True, False, True]


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="empty"):
        generate(model, [], 3)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [1], 3, top_p=1.5)


def test_generation_with_compiled_blocks_runs_eagerly_and_agrees(model):
    """Compiled blocks would recompile as the KV cache grows: generation must not compile at all
    (torch.compile's own frame counter stays at zero), and gives the eager model's tokens."""
    import dataclasses

    from torch._dynamo.utils import counters

    compiled = Transformer(dataclasses.replace(model.cfg, compile=True)).eval()
    compiled.load_state_dict(model.state_dict())
    counters.clear()
    got = generate(compiled, [3, 1, 4, 1, 5], max_new_tokens=15, temperature=0)
    assert counters["frames"]["total"] == 0, dict(counters["frames"])
    assert got == generate(model, [3, 1, 4, 1, 5], max_new_tokens=15, temperature=0)
