"""`pretrain generate` from a training checkpoint and from an export directory.

The checkpoint is written in-process through Checkpointer with an engine stand-in that stores the
module exactly as DeepSpeed ZeRO-0 does (``engine/mp_rank_00_model_states.pt`` with ``module``),
so these tests need no process group; sharded ZeRO checkpoints are covered by test_export.py.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pretrain.checkpoint import Checkpointer, TrainState
from pretrain.config import load_config
from pretrain.dist import DistInfo

REPO = Path(__file__).resolve().parents[2]


class ZeroZeroEngine:
    """Saves like a DeepSpeed ZeRO-0 engine: the whole module in mp_rank_00_model_states.pt."""

    def __init__(self, model):
        self.module = model
        self._config = SimpleNamespace(load_universal_checkpoint=False)

    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest=True):
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"module": self.module.state_dict(), "dp_world_size": 1}, d / "mp_rank_00_model_states.pt")


@pytest.fixture(scope="module")
def ckpt(tokenizer_path, tmp_path_factory):
    from pretrain.model import Transformer

    root = tmp_path_factory.mktemp("gen")
    cfg = load_config(REPO / "configs" / "model" / "tiny.yaml", [
        f"checkpoint.dir={root / 'run' / 'checkpoints'}", "model.vocab_size=4096", "model.vocab_multiple_of=96",
        "model.max_seq_len=64", "data.seq_len=64", "model.tie_embeddings=true", "deepspeed.zero_stage=0"])
    torch.manual_seed(0)
    model = Transformer(cfg.model).eval()
    info = DistInfo(rank=0, local_rank=0, world_size=1, backend="gloo", device="cpu")
    step_dir = Checkpointer(cfg, ZeroZeroEngine(model), info, str(tokenizer_path)).save(TrainState(step=1), {})
    return SimpleNamespace(root=root, step_dir=Path(step_dir), model=model, tokenizer=tokenizer_path)


def args(path, prompt="The river", **kw):
    base = dict(checkpoint=str(path), prompt=prompt, max_new_tokens=8, temperature=0.0, top_k=50, top_p=0.95, seed=0)
    return argparse.Namespace(**{**base, **kw})


def test_checkpoint_and_export_give_the_same_greedy_text(ckpt, tmp_path, capsys):
    from tokenizers import Tokenizer

    from pretrain.export import export_checkpoint
    from pretrain.generate import generate_cli
    from pretrain.sampling import generate

    tok = Tokenizer.from_file(str(ckpt.tokenizer))
    prompt_ids = tok.encode("The river", add_special_tokens=False).ids
    expect = "The river" + tok.decode(generate(ckpt.model, prompt_ids, max_new_tokens=8, temperature=0.0,
                                               eos_id=tok.token_to_id("<|endoftext|>")), skip_special_tokens=False)

    assert generate_cli(args(ckpt.root / "run")) == 0  # run directory form
    from_ckpt = capsys.readouterr().out.rstrip("\n")
    export = export_checkpoint(ckpt.step_dir, tmp_path / "hf")
    assert generate_cli(args(export)) == 0
    from_export = capsys.readouterr().out.rstrip("\n")
    assert from_ckpt == from_export == expect
    assert len(from_ckpt) > len("The river")


def test_seeded_sampling_is_reproducible(ckpt, capsys):
    from pretrain.generate import generate_cli

    outs = []
    for seed in (1, 1, 2, 3):
        generate_cli(args(ckpt.step_dir, temperature=1.0, top_k=0, top_p=1.0, seed=seed, max_new_tokens=12))
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1]  # same seed, same text
    assert len(set(outs[1:])) > 1  # an untrained 4096-token model: other seeds give other text


def test_cli_and_bad_arguments(ckpt):
    cmd = [sys.executable, "-m", "pretrain", "generate", "--checkpoint", str(ckpt.step_dir), "--prompt", "Hello",
           "--max-new-tokens", "4", "--seed", "3"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith("Hello")
    # It says which tokenizer encodes the prompt: the checkpoint's own copy, and where that came from.
    assert (f"tokenizer: the one saved with the checkpoint, {ckpt.tokenizer.resolve()}, saved with it as "
            f"{ckpt.step_dir / 'tokenizer.json'} (sha256 ") in p.stderr
    p = subprocess.run([*cmd, "--top-p", "0"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--top-p" in p.stderr
    p = subprocess.run([*cmd[:5], str(ckpt.root / "nothing"), *cmd[6:]], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and "nothing" in p.stderr


def test_negative_top_k_is_refused_naming_the_flag(ckpt):
    from pretrain.errors import UserError
    from pretrain.generate import generate_cli

    with pytest.raises(UserError, match="--top-k must be >= 0"):
        generate_cli(args(ckpt.step_dir, top_k=-5))


def test_foreign_export_dir_is_refused_naming_its_config(tmp_path):
    import json

    from pretrain.errors import UserError
    from pretrain.generate import load_for_inference

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match=rf"{tmp_path / 'config.json'} has model_type 'gpt2'"):
        load_for_inference(tmp_path)


def test_export_keeps_the_checkpoint_tokenizer_and_generate_refuses_another_in_its_place(ckpt, tmp_path, caplog,
                                                                                         capsys):
    """An export directory is loose files: generate checks its tokenizer.json against the one the
    export recorded, by content (re-saving it is fine; another tokenizer decodes into other text)."""
    import json
    import logging

    from pretrain.errors import UserError
    from pretrain.export import export_checkpoint
    from pretrain.fileio import json_sha256
    from pretrain.generate import generate_cli

    with caplog.at_level(logging.INFO, logger="pretrain"):
        out = export_checkpoint(ckpt.step_dir, tmp_path / "hf")
    assert f"tokenizer: the one saved with the checkpoint, {ckpt.tokenizer.resolve()}" in caplog.text
    assert (out / "tokenizer.json").read_bytes() == (ckpt.step_dir / "tokenizer.json").read_bytes()
    recorded = json.loads((out / "export_info.json").read_text())["tokenizer_sha256"]
    assert recorded == json_sha256(ckpt.tokenizer.read_bytes())

    assert generate_cli(args(out)) == 0
    expect = capsys.readouterr().out
    doc = json.loads((out / "tokenizer.json").read_text())
    (out / "tokenizer.json").write_text(json.dumps(doc, indent=3, ensure_ascii=True))  # re-saved: same tokenizer
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pretrain"):
        assert generate_cli(args(out)) == 0
    assert capsys.readouterr().out == expect
    assert f"tokenizer: the one exported with the model, {(out / 'tokenizer.json').resolve()} (sha256 " \
           f"{recorded[:12]})" in caplog.text

    vocab = doc["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same size, two ids swapped: another tokenizer
    (out / "tokenizer.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match=rf"{out / 'tokenizer.json'} is not the tokenizer this model was exported "
                                        rf"with: .* records {recorded[:12]}"):
        generate_cli(args(out))
