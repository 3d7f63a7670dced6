"""The memorization audit: scoring, exposure and extraction on models whose answer is known, and
the whole path (scrub with canaries -> train -> `pretrain audit` -> export) on a real run."""

from __future__ import annotations

import ctypes
import json
import os
import statistics
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _hf_exposure import recompute
from _trainer_helpers import run_train

from data_pipelines.scrub.canaries import make_canaries, read_registry, references, registry_path
from data_pipelines.tokenizer import build_bpe
from pretrain.audit import audit_canary, run_audit, secret_bits, split_tokens, summarize
from pretrain.config import ModelConfig, load_config
from pretrain.errors import UserError
from pretrain.model import Transformer

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
STEPS = 120  # enough for the tiny model to memorize one 8-digit secret among others of its form
FIELDS = {"id", "family", "kind", "repetitions", "prefix", "secret", "present_after_scrub", "exposure_bits",
          "extracted", "reference_count", "space_bits"}


# --------------------------------------------------------------------------------------------
# A tiny tokenizer and model whose memorization is known
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    """A byte-level BPE (the project's builder) over sentences of every canary kind."""
    cs = make_canaries(0, [1, 2, 3], 4, 5, ["email", "phone", "credit_card", "ssn", "api_key"])
    texts = [c.sentence for c in cs] + [c.prefix + r + "." for c in cs for r in references(c, 30, 9)]
    t, trainer = build_bpe(600, 1, ["<|endoftext|>"])
    t.train_from_iterator(texts * 3, trainer=trainer)
    return t


def tiny_model(tok, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), vocab_multiple_of=8, n_layers=2, n_heads=4, d_model=64,
                      max_seq_len=64, attention="sdpa")
    return Transformer(cfg).eval()


def full_forward_bits(model: Transformer, prefix_ids: list[int], secret_ids: list[int]) -> float:
    """The plain definition: one whole-sequence forward, -log2 p of the secret tokens."""
    ids = torch.tensor([prefix_ids + secret_ids])
    with torch.no_grad():
        logp = F.log_softmax(model(ids)[0].float(), -1)
    P = len(prefix_ids)
    return -sum(float(logp[P + j - 1, t]) for j, t in enumerate(secret_ids)) / 0.6931471805599453


def test_batched_scores_equal_whole_sequence_forwards(tok):
    """The shared-prefix cache, right padding and batching change nothing: candidates of different
    token lengths (an e-mail, an API key) score exactly as a plain forward of each sentence."""
    model = tiny_model(tok)
    for c in make_canaries(1, [1], 0, 5, ["email", "phone", "credit_card", "ssn", "api_key"]):
        prefix_ids, tails = split_tokens(tok, c.prefix, [c.secret, *references(c, 11, 0)])
        assert len({len(t) for t in tails}) > 1 or c.kind in ("ssn", "phone", "credit_card")
        got = secret_bits(model, prefix_ids, tails, batch_size=5)
        want = [full_forward_bits(model, prefix_ids, t) for t in tails]
        assert got == pytest.approx(want, abs=1e-3), c.kind


@pytest.mark.slow
def test_a_memorized_canary_has_top_exposure_and_is_extracted_an_untrained_model_sits_at_chance(tok):
    canaries = make_canaries(5, [1], 12, 0, [])
    untrained = tiny_model(tok, seed=1)
    chance = [audit_canary(untrained, tok, None, c, 256, 0, 128) for c in canaries]
    rank_bits = [r["exposure_bits"]["rank"] for r in chance]
    extrapolated = [r["exposure_bits"]["extrapolated"] for r in chance]
    # A canary scored like its references: uniform rank, 1.44 bits on average; nothing extracted.
    assert statistics.median(rank_bits) <= 2 and 0.3 < statistics.mean(rank_bits) < 3
    assert statistics.median(extrapolated) <= 2.5 and not any(r["extracted"] for r in chance)

    # Train one canary in (its sentence among others of the same form, so the model must learn
    # which digits follow this vault's prefix, not digits after any prefix).
    target, others = canaries[0], canaries[1:]
    model = tiny_model(tok, seed=1).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    pool = [o.prefix + r + "." for o in others for r in references(o, 8, 3)]
    for _ in range(STEPS):
        picks = torch.randint(len(pool), (7,), generator=gen).tolist()
        batch = [tok.encode(target.sentence).ids] + [tok.encode(pool[i]).ids for i in picks]
        T = max(len(b) for b in batch)
        ids = torch.tensor([b + [0] * (T - len(b)) for b in batch])
        labels = torch.tensor([b[1:] + [-100] * (T - len(b) + 1) for b in batch])
        loss = model(ids, labels=labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    r = audit_canary(model, tok, None, target, 256, 0, 128)
    assert r["rank"] == 1 and r["exposure_bits"]["rank"] == pytest.approx(8.0)  # log2 256: the resolution limit
    assert r["exposure_bits"]["extrapolated"] > 10 and r["extracted"], r
    assert r["greedy"].startswith(target.secret)
    # Another canary of the same form, never trained on, gains nothing.
    assert audit_canary(model, tok, None, others[0], 256, 0, 128)["extracted"] is False


# --------------------------------------------------------------------------------------------
# The real path: scrubbed corpus with canaries -> train -> audit CLI -> export -> transformers
# --------------------------------------------------------------------------------------------


class OpenWatch:
    """Kernel (inotify) events for one file: an open or read by any process or library counts."""

    IN_ACCESS, IN_OPEN = 0x1, 0x20

    def __init__(self, path: Path) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0 or self.libc.inotify_add_watch(self.fd, str(path).encode(), self.IN_ACCESS | self.IN_OPEN) < 0:
            pytest.skip("inotify is not available here")

    def events(self) -> int:
        n = 0
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return n
            off = 0
            while off < len(data):
                _, _, _, name_len = struct.unpack_from("iIII", data, off)
                off += 16 + name_len
                n += 1

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture(scope="module")
def audited_run(scrubbed_corpus, tokenizer_path, tmp_path_factory) -> dict:
    """A 10-step run (1 process, ZeRO-2, wandb offline) on the demo corpus with its canaries, the
    registry watched throughout training; then `pretrain audit` through the CLI."""
    root = tmp_path_factory.mktemp("audit_run")
    cfg = root / "c.yaml"
    cfg.write_text(f"""
extends: {REPO}/configs/model/tiny.yaml
run: {{name: audit, dir: {root / 'run'}}}
scrub: {{output: {scrubbed_corpus}}}
data:
  sources: [{{name: wiki, path: {scrubbed_corpus}}}]
  tokenizer: {tokenizer_path}
  seq_len: 64
model: {{vocab_size: 4096, max_seq_len: 64}}
train: {{micro_batch_size: 4, max_steps: 10, eval_every: 0, log_every: 5, progress_bar: false, precision: fp32}}
optim: {{lr: 3.0e-3, warmup_steps: 3}}
deepspeed: {{zero_stage: 2}}
checkpoint: {{every_steps: 0, save_on_exit: true}}
wandb: {{mode: offline}}
audit: {{references: 64, batch_size: 32}}
""")
    registry = registry_path(load_config(cfg).scrub)
    watch = OpenWatch(registry)
    try:
        run_train(cfg, nproc=1)
        opened_in_training = watch.events()
        registry.read_bytes()  # the watch itself works: this read is seen
        seen_after = watch.events()
    finally:
        watch.close()
    p = subprocess.run([PY, "-m", "pretrain", "audit", str(cfg)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return {"config": cfg, "run": root / "run", "registry": registry, "stdout": p.stdout,
            "opened_in_training": opened_in_training, "seen_after": seen_after}


@pytest.mark.slow
def test_training_never_opens_the_registry(audited_run):
    assert audited_run["seen_after"] >= 1  # a positive control: the watch sees an ordinary read
    assert audited_run["opened_in_training"] == 0


@pytest.mark.slow
def test_audit_writes_every_field_and_logs_into_the_training_wandb_run(audited_run):
    out = audited_run["run"] / "audit"
    result = json.loads((out / "memorization.json").read_text())
    reg = read_registry(audited_run["registry"])
    assert [r["id"] for r in result["canaries"]] == [c.id for c in reg.canaries]
    for row in result["canaries"]:
        assert set(row) == FIELDS and set(row["exposure_bits"]) == {"rank", "extrapolated"}
        assert row["present_after_scrub"] is (row["family"] == "control")  # the scrub redacted every PII copy
        assert row["reference_count"] == 64 and row["space_bits"] > 20
    assert result["step"] == 10 and (out / "exposure.png").stat().st_size > 10_000
    assert "| `control-digits-r64-0` | control | 64 | yes |" in audited_run["stdout"]
    # One wandb run: the audit resumed the training run's id (offline: one directory per attempt).
    ids = {d.name.rsplit("-", 1)[-1] for d in (audited_run["run"] / "wandb").glob("offline-run-*")}
    dirs = list((audited_run["run"] / "wandb").glob("offline-run-*"))
    assert len(dirs) == 2 and len(ids) == 1


@pytest.mark.slow
def test_exported_model_recomputes_the_same_exposures(audited_run, tmp_path):
    """transformers on the export, scoring whole sentences, agrees with the audit per canary."""
    p = subprocess.run([PY, "-m", "pretrain", "export", "--checkpoint", str(audited_run["run"]), "--out",
                        str(tmp_path / "hf")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = recompute(tmp_path / "hf", audited_run["run"] / "audit" / "memorization.json")
    assert len(rows) == len(read_registry(audited_run["registry"]).canaries)
    for r in rows:
        for k in ("rank", "extrapolated"):
            assert abs(r["reported"][k] - r["recomputed"][k]) <= 1.5, r


@pytest.mark.slow
def test_audit_refuses_a_registry_of_another_scrub(audited_run, tmp_path):
    reg = json.loads(audited_run["registry"].read_text())
    reg["config_hash"] = "0" * 64
    (tmp_path / "other.canaries.json").write_text(json.dumps(reg))
    cfg = load_config(audited_run["config"], [f"scrub.canaries.registry={tmp_path / 'other.canaries.json'}"])
    with pytest.raises(UserError, match="not among the sources"):
        run_audit(cfg)


def test_summary_rise_counts_levels_at_the_rank_resolution_as_not_falling():
    """Rank exposure saturates at log2 N: two levels both there do not break the rise; a real fall does."""
    def rows(medians: dict[int, list[float]]) -> list[dict]:
        return [{"family": "control", "repetitions": n, "reference_count": 2048, "extracted": False,
                 "present_after_scrub": True, "exposure_bits": {"rank": e, "extrapolated": e + 1}}
                for n, es in medians.items() for e in es]

    saturated = summarize(rows({1: [1.2, 0.8], 16: [7.0, 7.6], 32: [11.0, 11.0], 64: [11.0, 11.0]}))["control"]
    assert saturated["medians_rise_with_repetitions"] and saturated["levels"]["32"]["median_rank_bits"] == 11.0
    fall = summarize(rows({1: [2.2, 2.0], 4: [1.0, 1.2], 16: [4.0, 4.4], 64: [11.0, 11.0]}))["control"]
    assert not fall["medians_rise_with_repetitions"]
    flat_below = summarize(rows({1: [3.0, 3.0], 16: [3.0, 3.0]}))["control"]
    assert not flat_below["medians_rise_with_repetitions"]  # equal medians below the resolution: no rise
    assert saturated["spearman_repetitions_exposure"] > 0.8
