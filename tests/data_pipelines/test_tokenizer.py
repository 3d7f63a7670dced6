"""Tokenizer training on scrubbed shards: special tokens never split, gate, foreign tokenizer.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipelines.scrub.filters.pii_types import DOCUMENT_SEPARATOR, PLACEHOLDERS
from data_pipelines.scrub.manifest import shard_entry, shard_name, write_manifest
from data_pipelines.tokenizer import load_tokenizer, separator_id, train_tokenizer
from pretrain.config import load_config
from pretrain.errors import UserError

WORDS = ("the quick brown fox jumps over lazy dog river mountain history science city music "
         "language people world government university century population village station").split()


def _text(i: int) -> str:
    words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(60)]
    words[10] = PLACEHOLDERS["email"]
    words[20] = "call" + PLACEHOLDERS["phone"] + "now"  # glued to text
    return " ".join(words) + "."


@pytest.fixture(scope="module")
def scrubbed(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scrubbed")
    rel = shard_name(0, 0, "parquet")
    (out / rel).parent.mkdir(parents=True)
    texts = [_text(i) for i in range(80)]
    pq.write_table(pa.table({"id": [f"t{i}" for i in range(80)], "text": texts, "source": ["t"] * 80,
                             "meta": ["{}"] * 80}), out / rel, compression="zstd")
    write_manifest(out, {"config_hash": "x", "shards": [shard_entry(out, rel, 80)],
                         "documents": {"read": 80, "kept": 80, "dropped": 0},
                         "pii": {"placeholders": dict(PLACEHOLDERS), "counts": {}}, "filters": {}, "inputs": []})
    return out


@pytest.fixture(scope="module")
def trained(scrubbed, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    cfg = load_config(None, [f"tokenizer.input={scrubbed}", f"tokenizer.output={out}", "tokenizer.vocab_size=400"])
    assert train_tokenizer(cfg) == 0
    return out / "tokenizer.json"


def test_special_tokens_are_atoms_and_separator_is_found(trained):
    tok = load_tokenizer(trained)
    assert 300 < tok.get_vocab_size() <= 400
    assert separator_id(tok) == tok.token_to_id(DOCUMENT_SEPARATOR) == 0
    for ph in PLACEHOLDERS.values():
        tid = tok.token_to_id(ph)
        assert tid is not None
        for text in (ph, f"x{ph}y", f"mail me at {ph}, thanks", f"{ph}{ph}"):
            ids = tok.encode(text, add_special_tokens=False).ids
            assert ids.count(tid) == text.count(ph), (text, ids)
            assert tok.decode(ids, skip_special_tokens=False) == text  # byte-level: lossless
    text = "Zürich — naïve café ☃ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"  # unseen characters still round-trip (byte fallback)
    assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text
    cfg = json.loads((trained.parent / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == DOCUMENT_SEPARATOR


def test_bpe_learned_merges_from_the_corpus(trained):
    tok = load_tokenizer(trained)
    assert len(tok.encode("university government", add_special_tokens=False).ids) <= 4


def test_max_docs_limits_the_sample(scrubbed, tmp_path):
    cfg = load_config(None, [f"tokenizer.input={scrubbed}", f"tokenizer.output={tmp_path}",
                             "tokenizer.vocab_size=2000", "tokenizer.max_docs=1"])
    train_tokenizer(cfg)
    full = load_config(None, [f"tokenizer.input={scrubbed}", f"tokenizer.output={tmp_path / 'full'}",
                              "tokenizer.vocab_size=2000"])
    train_tokenizer(full)
    small = load_tokenizer(tmp_path).get_vocab_size()
    assert small < load_tokenizer(tmp_path / "full").get_vocab_size()


def test_refuses_unscrubbed_input_unless_allowed(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.jsonl").write_text("".join(json.dumps({"text": _text(i)}) + "\n" for i in range(30)))
    cfg = load_config(None, [f"tokenizer.input={raw}", f"tokenizer.output={tmp_path / 'o'}", "tokenizer.vocab_size=300"])
    with pytest.raises(UserError, match=rf"tokenizer.input: {raw} has no scrub manifest"):
        train_tokenizer(cfg)
    cfg.data.require_scrubbed = False
    assert train_tokenizer(cfg) == 0 and (tmp_path / "o" / "tokenizer.json").is_file()


def test_foreign_tokenizer_json_and_errors(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "hello": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    assert separator_id(load_tokenizer(tmp_path)) == 1  # a directory works too
    tok2 = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1}, unk_token="<unk>"))
    tok2.save(str(tmp_path / "noeos.json"))
    with pytest.raises(UserError, match="no end-of-document token"):
        separator_id(load_tokenizer(tmp_path / "noeos.json"))
    with pytest.raises(UserError, match="not found"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot be loaded"):
        load_tokenizer(tmp_path / "bad.json")


def test_cli_train_tokenizer(scrubbed, tmp_path):
    cfgfile = tmp_path / "c.yaml"
    cfgfile.write_text("tokenizer:\n  vocab_size: 300\n")
    r = subprocess.run([sys.executable, "-m", "data_pipelines", "train-tokenizer", str(cfgfile),
                        f"tokenizer.input={scrubbed}", f"tokenizer.output={tmp_path}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert load_tokenizer(tmp_path).get_vocab_size() <= 300


def test_max_docs_samples_evenly_across_the_corpus_and_skips_unpicked_chunks(scrubbed):
    """Not the first N documents: every part of the corpus is represented, exactly N in all."""
    from data_pipelines.loading.sources import Source
    from data_pipelines.tokenizer import _documents

    source = Source("t", str(scrubbed), 1.0, "text", "tokenizer.input", True, chunk_docs=8)
    read, real_read = [], source.read_chunk
    source.read_chunk = lambda c: read.append(c) or real_read(c)
    picked = list(_documents(source, 4))
    assert picked == [_text(i) for i in (19, 39, 59, 79)]
    assert read == [2, 4, 7, 9]  # only the chunks (of 8 rows) that hold a picked row
    assert len(list(_documents(source, 30))) == 30
    assert list(_documents(source, 0)) == list(_documents(source, 1000)) == [_text(i) for i in range(80)]
