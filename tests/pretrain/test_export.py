"""Export a real ZeRO-3 checkpoint (2 CPU ranks, sharded parameters and optimizer) to Hugging Face
Llama format and check transformers' logits against the LIVE engine's (fp32, max abs diff < 1e-4).

The reference is not read back from the checkpoint (through the same ``consolidated_state_dict``
the exporter uses, a reassembly bug would cancel out): ``_live_logits.py`` trains under torchrun,
then gathers the engine's ZeRO-3 parameters in the training processes and saves logits on fixed ids.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _trainer_helpers import free_port

REPO = Path(__file__).resolve().parents[2]
LIVE = Path(__file__).resolve().parent / "_live_logits.py"
PY = sys.executable


@pytest.fixture(scope="module")
def zero3_run(scrubbed_corpus, tokenizer_path, tmp_path_factory) -> Path:
    """3 training steps, 2 ranks, ZeRO-3 fp32, through `pretrain.__main__.main`; the run dir, whose
    live.pt holds the live engine's logits (see _live_logits.py)."""
    root = tmp_path_factory.mktemp("export_run")
    cfg = root / "c.yaml"
    cfg.write_text(f"""
extends: {REPO}/configs/model/tiny.yaml
run: {{name: e, dir: {root / 'run'}}}
data:
  sources: [{{name: wiki, path: {scrubbed_corpus}}}]
  tokenizer: {tokenizer_path}
  seq_len: 32
model: {{vocab_size: 4096, vocab_multiple_of: 96, max_seq_len: 64}}
train: {{micro_batch_size: 2, max_steps: 3, eval_every: 0, log_every: 1, progress_bar: false, precision: fp32}}
optim: {{lr: 1.0e-2, warmup_steps: 1}}
deepspeed: {{zero_stage: 3, stage3_param_persistence_threshold: 0}}
checkpoint: {{every_steps: 0, save_on_exit: true}}
wandb: {{mode: disabled}}
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(LIVE), str(root / "run" / "live.pt"), str(cfg)]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    return root / "run"


@pytest.mark.slow
def test_export_fp32_matches_transformers_logits(zero3_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hf"
    # The CLI, given the run directory: picks the newest complete checkpoint.
    p = subprocess.run([PY, "-m", "pretrain", "export", "--checkpoint", str(zero3_run), "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "generation_config.json"} <= {f.name for f in out.iterdir()}

    step_dir = zero3_run / "checkpoints" / "step_00000003"
    # Really sharded: one ZeRO-3 partition (parameters + optimizer) per rank was consolidated.
    assert len(list((step_dir / "engine").glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"))) == 2
    live = torch.load(zero3_run / "live.pt", weights_only=True)
    meta = json.loads((step_dir / "meta.json").read_text())  # the data the run saw, by reference
    assert meta["scrub_manifests"][0]["sha256"] and meta["scrub_manifests"][0]["config_hash"]
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.config.vocab_size == 4096 and hf.model.embed_tokens.weight.shape == (4096, 64)
    assert live["embed_rows"] == 4128  # padded to a multiple of 96 in training, sliced by the export

    ids, a = live["ids"], live["logits"]
    with torch.no_grad():
        b = hf(ids).logits
    assert a.shape == b.shape == (2, 48, 4096)
    diff = (a - b).abs().max().item()
    assert diff < 1e-4, f"exported model's logits differ from the live engine's by up to {diff}"

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == hf.config.eos_token_id
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(out / "tokenizer.json"))
    text = "The history of the city began in 1820."
    assert tok(text)["input_ids"] == raw.encode(text, add_special_tokens=False).ids


@pytest.mark.slow
def test_export_bf16_and_refusals(zero3_run, tmp_path):
    from safetensors import safe_open

    from pretrain.checkpoint import CheckpointError
    from pretrain.errors import UserError
    from pretrain.export import export_checkpoint

    out = export_checkpoint(zero3_run / "checkpoints", tmp_path / "bf16", dtype="bf16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
        assert "lm_head.weight" in f.keys()  # untied model

    # A tampered copy is refused before anything is unpickled, naming the file; exit status 2.
    bad = tmp_path / "bad"
    shutil.copytree(zero3_run / "checkpoints" / "step_00000003", bad / "step_00000003")
    shard = next((bad / "step_00000003" / "engine").glob("*optim_states.pt"))
    with open(shard, "r+b") as f:
        f.seek(100)
        f.write(b"\x00" * 8)
    with pytest.raises(CheckpointError, match=shard.name):
        export_checkpoint(bad, tmp_path / "x")
    p = subprocess.run([PY, "-m", "pretrain", "export", "--checkpoint", str(bad), "--out", str(tmp_path / "y")],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and shard.name in p.stderr and "sha256" in p.stderr
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        export_checkpoint(zero3_run, tmp_path / "occupied")


def test_parameter_names_map_one_to_one_both_ways():
    from pretrain.config import load_config
    from pretrain.export import _expected_names, hf_name, our_name

    names = _expected_names(load_config(None, ["model.n_layers=2"]).model)
    hf = {hf_name(n) for n in names}
    assert len(hf) == len(names) and all(our_name(hf_name(n)) == n for n in names)
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
            "model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"} <= hf
    for bad in ("blocks.0.attn.rope.freqs", "blocks.x"):
        with pytest.raises(KeyError):
            hf_name(bad)
    with pytest.raises(KeyError):
        our_name("model.layers.0.self_attn.rotary_emb.inv_freq")
