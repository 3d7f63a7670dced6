"""An independent recomputation of the audit's exposures from the exported Hugging Face model.

Shares nothing with ``pretrain.audit`` but the reference secrets (regenerated from the recorded
seed by ``data_pipelines.scrub.canaries.references``): the weights come from the export's
safetensors through transformers' ``LlamaForCausalLM``, the tokens from transformers' fast
tokenizer, every candidate is scored with a full-sequence forward (no shared prefix cache) and
the secret's tokens are found by character offsets; rank and skew-normal exposure are computed
here from their definitions. Agreement with memorization.json therefore checks checkpoint
loading, consolidation, tokenization, batching and the estimators at once.

    python tests/pretrain/_hf_exposure.py RUN_DIR/export RUN_DIR/audit/memorization.json
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import skewnorm

from data_pipelines.scrub.canaries import Canary, references


def _load(export_dir: Path):
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(export_dir / "tokenizer.json"))
    tok.pad_token = "<|endoftext|>"
    tok.padding_side = "right"
    model = LlamaForCausalLM.from_pretrained(str(export_dir), dtype=torch.float32).eval()
    return tok, model


@torch.no_grad()
def _secret_bits(tok, model, prefix: str, secrets: list[str], batch_size: int) -> np.ndarray:
    """-log2 p(secret | prefix): a whole-sentence forward; the secret's tokens are those starting at
    or after the prefix's last character (by offsets; padding excluded by the attention mask)."""
    out = []
    for start in range(0, len(secrets), batch_size):
        texts = [prefix + s for s in secrets[start : start + batch_size]]
        enc = tok(texts, add_special_tokens=False, padding=True, return_offsets_mapping=True, return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)[:, :-1]
        token_logp = logp.gather(-1, ids[:, 1:, None])[..., 0]  # log p of token t+1 given tokens <= t
        in_secret = (mask[:, 1:] == 1) & (enc["offset_mapping"][:, 1:, 0] >= len(prefix))
        out.append((-(token_logp * in_secret).sum(-1) / math.log(2)).double().numpy())
    return np.concatenate(out)


def recompute(export_dir: str | Path, memorization: str | Path, batch_size: int = 256) -> list[dict]:
    """Per canary of memorization.json: its reported exposures and the recomputed ones."""
    export_dir = Path(export_dir)
    result = json.loads(Path(memorization).read_text())
    tok, model = _load(export_dir)
    n = result["reference_count"]
    rows = []
    for r in result["canaries"]:
        canary = Canary(r["id"], r["family"], r["kind"], r["repetitions"], r["prefix"], r["secret"])
        bits = _secret_bits(tok, model, canary.prefix, [canary.secret, *references(canary, n, result["reference_seed"])],
                            batch_size)
        lower = int((bits[1:] < bits[0]).sum())
        a, loc, scale = skewnorm.fit(bits[1:])
        tail = -float(skewnorm.logcdf(bits[0], a, loc, scale)) / math.log(2)
        rows.append({"id": r["id"], "reported": r["exposure_bits"],
                     "recomputed": {"rank": math.log2(n) - math.log2(1 + lower),
                                    "extrapolated": min(r["space_bits"], max(0.0, tail))}})
    return rows


def main(argv: list[str]) -> int:
    rows = recompute(argv[0], argv[1])
    worst = 0.0
    print(f"{'canary':26} {'rank (audit / HF)':>20} {'extrapolated (audit / HF)':>28}")
    for r in rows:
        a, b = r["reported"], r["recomputed"]
        worst = max(worst, abs(a["rank"] - b["rank"]), abs(a["extrapolated"] - b["extrapolated"]))
        print(f"{r['id']:26} {a['rank']:9.2f} / {b['rank']:6.2f} {a['extrapolated']:16.2f} / {b['extrapolated']:6.2f}")
    print(f"largest difference: {worst:.3f} bits over {len(rows)} canaries")
    return 0 if worst <= 1.5 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
