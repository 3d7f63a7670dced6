"""`python -m pretrain generate`: sample from a training checkpoint or an export directory.

A training checkpoint (run dir, checkpoint dir or step dir) is verified against its marker and
its ZeRO shards consolidated; an export directory is read from ``model.safetensors`` (no pickle).
The tokenizer is always the one saved with the model (the checkpoint's copy, or the export's, which
must still be the one ``export_info.json`` records); the command says which. Sampling is
:func:`pretrain.sampling.generate` (KV cache, temperature, top-k, top-p, seed).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from pretrain.checkpoint import (
    TOKENIZER_FILE,
    TokenizerRef,
    consolidated_state_dict,
    load_checkpoint_config,
    read_tokenizer,
    resolve_checkpoint,
    saved_tokenizer,
)
from pretrain.config import ModelConfig
from pretrain.errors import UserError
from pretrain.export import EOS_TOKEN, from_hf_state_dict, model_config_from_hf
from pretrain.model import Transformer
from pretrain.sampling import generate

log = logging.getLogger(__name__)


def is_export_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and (p / "model.safetensors").is_file()


def load_for_inference(path: str | os.PathLike, device: str = "cpu") -> tuple[Any, Any, int | None]:
    """(Transformer in eval mode, tokenizers.Tokenizer or None, eos id or None) from either source."""

    p = Path(path)
    if is_export_dir(p):
        info_path = p / "export_info.json"
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        tokenizer = _exported_tokenizer(p, info)  # a swapped tokenizer is refused before the weights are read
        if info.get("our_model_config"):
            known = {f.name for f in dataclasses.fields(ModelConfig)}
            mc = ModelConfig(**{k: v for k, v in info["our_model_config"].items() if k in known})
        else:
            mc = model_config_from_hf(json.loads((p / "config.json").read_text()), p / "config.json")
        sd = from_hf_state_dict({k: v.float() for k, v in load_file(str(p / "model.safetensors")).items()}, mc)
        tok_dir = p
        source = "exported with the model"
    else:
        step_dir = resolve_checkpoint(p)
        mc = load_checkpoint_config(step_dir).model
        sd = consolidated_state_dict(step_dir, verify=True)
        tok_dir = step_dir
        tokenizer = saved_tokenizer(step_dir)
        source = "saved with the checkpoint"
    mc = dataclasses.replace(mc, compile=False, activation_checkpointing="none")
    model = Transformer(mc)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise UserError(f"{p}: weights do not fit the model (missing {missing[:4]}, unexpected {unexpected[:4]})")
    model.to(device).eval()

    tok, eos_id = None, None
    if tokenizer is not None:
        log.info("tokenizer: the one %s, %s", source, tokenizer.describe())
        tok = Tokenizer.from_file(str(tok_dir / TOKENIZER_FILE))
        eos_id = tok.token_to_id(EOS_TOKEN)
    return model, tok, eos_id


def _exported_tokenizer(export_dir: Path, info: dict) -> TokenizerRef | None:
    """The export's tokenizer.json, refused when it is not the one the export wrote (an export
    directory is loose files: a tokenizer copied over it would decode the ids into other text)."""
    path = export_dir / TOKENIZER_FILE
    if not path.is_file():
        return None
    tokenizer = read_tokenizer(path)[1]
    expected = info.get("tokenizer_sha256")
    if expected and tokenizer.sha256 != expected:
        raise UserError(f"{path} is not the tokenizer this model was exported with: its sha256 is "
                        f"{tokenizer.sha256[:12]}, {export_dir / 'export_info.json'} records {expected[:12]} (the "
                        f"checkpoint's tokenizer); copy the checkpoint's tokenizer.json back or export again")
    return tokenizer

def generate_text(model: Any, tok: Any, eos_id: int | None, prompt: str, *, max_new_tokens: int = 64,
                  temperature: float = 0.8, top_k: int | None = 50, top_p: float | None = 0.95,
                  seed: int | None = 0) -> str:
    """Prompt text -> continuation text (without the prompt)."""
    ids = tok.encode(prompt, add_special_tokens=False).ids
    if not ids:
        if eos_id is None:
            raise UserError("the prompt encodes to no tokens and the tokenizer has no <|endoftext|> to start from")
        ids = [eos_id]  # an empty prompt starts a new document
    new = generate(model, ids, max_new_tokens=max_new_tokens, temperature=temperature,
                   top_k=top_k or None,
                   top_p=top_p if top_p is not None and 0 < top_p < 1 else None, seed=seed, eos_id=eos_id)
    if eos_id is not None and new and new[-1] == eos_id:
        new = new[:-1]
    return tok.decode(new, skip_special_tokens=False)


def generate_cli(args: Any) -> int:
    """args: checkpoint, prompt, max_new_tokens, temperature, top_k, top_p, seed."""
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1; got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UserError(f"--temperature must be >= 0; got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1]; got {args.top_p}")
    if args.top_k < 0:
        raise UserError(f"--top-k must be >= 0 (0 = no top-k filter); got {args.top_k}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok, eos_id = load_for_inference(args.checkpoint, device)
    if tok is None:
        raise UserError(f"{args.checkpoint} holds no {TOKENIZER_FILE}; cannot encode the prompt")
    text = generate_text(model, tok, eos_id, args.prompt, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    print(args.prompt + text, flush=True)
    return 0
