"""Export a training checkpoint (any ZeRO stage) to Hugging Face Llama format.

Output: ``config.json`` (LlamaForCausalLM), ``model.safetensors``, ``generation_config.json``,
``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json`` (eos = the document
separator ``<|endoftext|>``) and ``export_info.json`` (which checkpoint, which step, which tokenizer).
The tokenizer is always the copy saved with the checkpoint, the one its weights were trained with
(there is no option to pass another); the export says so. Our parameter
names map one to one onto Llama's and our RoPE already uses Llama's rotate_half layout, so the
export is a renaming plus slicing the padded vocabulary rows back to ``model.vocab_size``.
``transformers`` is not needed to export (only to load the result).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from pretrain.checkpoint import (
    TOKENIZER_FILE,
    CheckpointError,
    TokenizerRef,
    consolidated_state_dict,
    load_checkpoint_config,
    resolve_checkpoint,
    saved_tokenizer,
    verify_checkpoint,
)
from pretrain.config import ModelConfig
from pretrain.errors import UserError
from pretrain.fileio import write_json_atomic
from pretrain.model import ffn_hidden_size, n_kv_heads, padded_vocab_size

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}

# ours -> Hugging Face Llama, per block
_BLOCK_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.w_gate.weight": "mlp.gate_proj.weight",
    "mlp.w_up.weight": "mlp.up_proj.weight",
    "mlp.w_down.weight": "mlp.down_proj.weight",
}


_TOP_MAP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
            "lm_head.weight": "lm_head.weight"}


def hf_name(ours: str) -> str:
    """Our parameter name -> Hugging Face Llama's (KeyError for a name Llama has no place for)."""
    if ours in _TOP_MAP:
        return _TOP_MAP[ours]
    parts = ours.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks" and parts[2] in _BLOCK_MAP:
        return f"model.layers.{parts[1]}.{_BLOCK_MAP[parts[2]]}"
    raise KeyError(ours)


def our_name(hf: str) -> str:
    """The inverse of :func:`hf_name`."""
    for ours, theirs in _TOP_MAP.items():
        if hf == theirs:
            return ours
    parts = hf.split(".", 3)
    block = {v: k for k, v in _BLOCK_MAP.items()}
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in block:
        return f"blocks.{parts[2]}.{block[parts[3]]}"
    raise KeyError(hf)


def to_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our (padded-vocabulary) weights -> Llama names, vocabulary rows sliced to model.vocab_size."""
    expected = _expected_names(cfg)
    missing, unexpected = sorted(expected - sd.keys()), sorted(sd.keys() - expected)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint weights do not match model config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    out = {}
    for k, v in sd.items():
        if k in ("embed.weight", "lm_head.weight"):
            v = v[: cfg.vocab_size]
        out[hf_name(k)] = v.contiguous().clone()
    return out


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Llama weights -> ours, zero-padding the vocabulary rows up to model.vocab_multiple_of."""
    pad = padded_vocab_size(cfg)
    out = {}
    for k, v in hf.items():
        name = our_name(k)
        if name in ("embed.weight", "lm_head.weight") and v.shape[0] < pad:
            v = torch.cat([v, v.new_zeros(pad - v.shape[0], v.shape[1])])
        out[name] = v
    return out


def _expected_names(cfg: ModelConfig) -> set[str]:
    names = {"embed.weight", "norm.weight"}
    if not cfg.tie_embeddings:
        names.add("lm_head.weight")
    for i in range(cfg.n_layers):
        names |= {f"blocks.{i}.{k}" for k in _BLOCK_MAP}
    return names


def hf_config(cfg: ModelConfig, dtype: str, eos_id: int | None) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": ffn_hidden_size(cfg),
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": n_kv_heads(cfg),
        "head_dim": cfg.d_model // cfg.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        # transformers >= 5 reads rope_parameters; 4.x reads rope_theta.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "use_cache": True,
        "torch_dtype": DTYPES[dtype],
        "dtype": DTYPES[dtype],
    }


def model_config_from_hf(config: dict, source: str | os.PathLike = "config.json") -> ModelConfig:
    """The ModelConfig of an exported directory's config.json (for `generate`)."""
    if config.get("model_type") != "llama":
        raise UserError(f"{source} has model_type {config.get('model_type')!r}; only exported Llama models are supported")
    rope = (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta", 10000.0))
    return ModelConfig(
        vocab_size=config["vocab_size"],
        vocab_multiple_of=1,
        n_layers=config["num_hidden_layers"],
        n_heads=config["num_attention_heads"],
        n_kv_heads=config.get("num_key_value_heads"),
        d_model=config["hidden_size"],
        ffn_hidden=config["intermediate_size"],
        max_seq_len=config["max_position_embeddings"],
        rope_theta=float(rope),
        norm_eps=config["rms_norm_eps"],
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        attention="auto",
    )


def _tokenizer_files(step_dir: Path, out: Path, cfg_max_len: int) -> tuple[int | None, TokenizerRef | None]:
    """Copy the checkpoint's tokenizer.json and write the transformers side files; returns the eos
    id and the tokenizer's identity."""
    src = step_dir / TOKENIZER_FILE
    tokenizer = saved_tokenizer(step_dir)
    if tokenizer is None:
        log.warning("checkpoint %s holds no tokenizer copy: the export has no tokenizer files", step_dir)
        return None, None
    log.info("tokenizer: the one saved with the checkpoint, %s", tokenizer.describe())
    shutil.copyfile(src, out / TOKENIZER_FILE)
    eos_id = Tokenizer.from_file(str(src)).token_to_id(EOS_TOKEN)
    if eos_id is None:
        raise CheckpointError(f"{src} has no {EOS_TOKEN} token")
    write_json_atomic(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_TOKEN,
        "bos_token": EOS_TOKEN,
        "unk_token": None,
        "pad_token": None,
        "model_max_length": cfg_max_len,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
    })
    write_json_atomic(out / "special_tokens_map.json", {"eos_token": EOS_TOKEN, "bos_token": EOS_TOKEN})
    return eos_id, tokenizer


def export_checkpoint(ckpt: str | os.PathLike, out: str | os.PathLike, dtype: str = "fp32") -> Path:
    """Checkpoint (run dir, checkpoint dir or step dir) -> Hugging Face Llama directory ``out``."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    step_dir = resolve_checkpoint(ckpt)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "export_info.json").is_file():
        raise UserError(f"--out {out} exists, is not empty and is not an earlier export; choose another directory")
    marker = verify_checkpoint(step_dir)  # before anything unpickles a byte of it
    cfg = load_checkpoint_config(step_dir)
    sd = consolidated_state_dict(step_dir, verify=False)
    hf = to_hf_state_dict(sd, cfg.model)
    target = torch.float32 if dtype == "fp32" else torch.bfloat16
    hf = {k: v.to(target).contiguous() for k, v in hf.items()}

    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".model.safetensors.tmp"
    save_file(hf, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")
    eos_id, tokenizer = _tokenizer_files(step_dir, out, cfg.model.max_seq_len)
    write_json_atomic(out / "config.json", hf_config(cfg.model, dtype, eos_id))
    write_json_atomic(out / "generation_config.json", {"bos_token_id": eos_id, "eos_token_id": eos_id, "do_sample": True})
    write_json_atomic(out / "export_info.json", {
        "checkpoint": str(step_dir.resolve()),
        "step": marker.get("step"),
        "dtype": dtype,
        # generate checks the export's tokenizer.json against it (an export directory has no marker)
        "tokenizer_sha256": tokenizer.sha256 if tokenizer else None,
        "our_model_config": {k: getattr(cfg.model, k) for k in cfg.model.__dataclass_fields__},
    })
    n = sum(v.numel() for v in hf.values())
    log.info("exported %s (step %s, %.1fM parameters, %s) to %s", step_dir, marker.get("step"), n / 1e6, dtype, out)
    return out
