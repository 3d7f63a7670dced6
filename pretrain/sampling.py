"""Autoregressive sampling with a KV cache: temperature, top-k, top-p (nucleus), seeded.

The prompt is run through the model once (prefill) filling the cache; each new token then costs
one single-token forward. Greedy decoding (temperature 0) is deterministic and equals taking the
argmax of a full-sequence forward at every step (tested).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pretrain.model import KVCache, Transformer


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest set with mass >= top_p."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass strictly before it already reaches top_p (the first always stays).
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def generate(
    model: Transformer,
    prompt_ids: Sequence[int] | torch.Tensor,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_id: int | None = None,
) -> list[int]:
    """Sample up to ``max_new_tokens`` continuation tokens of ``prompt_ids``; returns only the new
    tokens (stopping after ``eos_id``, which is included). temperature 0 = greedy.

    The prompt plus continuation must fit in model.max_seq_len (the RoPE table); a longer prompt
    is cut to its last tokens so that it does.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    param = next(model.parameters())
    device = param.device
    ids = torch.as_tensor(list(prompt_ids) if not torch.is_tensor(prompt_ids) else prompt_ids, dtype=torch.long)
    ids = ids.flatten().to(device)
    if ids.numel() == 0:
        raise ValueError("prompt_ids is empty: give at least one token (e.g. the <|endoftext|> id)")
    max_len = model.cfg.max_seq_len
    max_new_tokens = min(max_new_tokens, max_len - 1)
    ids = ids[-(max_len - max_new_tokens):]

    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else torch.seed())
    was_training = model.training
    model.eval()
    # Compiled blocks (model.compile) would recompile as the cache grows; one-token decoding gains
    # nothing from compilation, so generation runs them eagerly.
    try:
        with torch.compiler.set_stance("force_eager"):
            cache = KVCache(model.cfg, 1, ids.numel() + max_new_tokens, device, param.dtype)
            logits = model(ids[None], cache=cache)[0, -1]
            out: list[int] = []
            for step in range(max_new_tokens):
                nxt = _pick(logits.float(), temperature, top_k, top_p, gen)
                out.append(nxt)
                if (eos_id is not None and nxt == eos_id) or step == max_new_tokens - 1:
                    break
                logits = model(torch.tensor([[nxt]], device=device), cache=cache)[0, -1]
        return out
    finally:
        model.train(was_training)


def _pick(logits: torch.Tensor, temperature: float, top_k, top_p, gen: torch.Generator) -> int:
    if temperature == 0:
        return int(logits.argmax())
    logits = filter_logits(logits / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=gen))
