"""`python -m data_pipelines pretokenize`: token ids of the training sources in memmap shards.

`pretokenize(cfg)` tokenizes every training source (scrubbed only: the privacy gate applies; the
validation hold-out of `data.val_fraction` is left out) into ``<dir>/<source>/<shard>.bin``
(uint16 when the vocabulary has fewer than 65,536 tokens, else uint32; documents joined by the
separator), one file per scrubbed shard, plus ``index.json`` (token counts, tokenizer hash, the
scrub manifests' hashes and copies under ``manifests/``). It is written last, atomically, and a
rerun with the same tokenizer and manifests does nothing.

The loader of these shards is :mod:`data_pipelines.loading.pretokenized`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from data_pipelines.loading.common import heldout_fraction, tokenizer_and_eos
from data_pipelines.loading.sources import is_heldout, open_sources
from pretrain.fileio import sha256_file, write_text_atomic

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size < 2**16 else np.dtype(np.uint32)


def pretokenize(cfg) -> int:
    """`python -m data_pipelines pretokenize`: data.sources -> data.pretokenized_dir."""
    d = cfg.data
    out = Path(d.pretokenized_dir)
    sources = open_sources(d.sources, "data.sources", d.require_scrubbed, d.chunk_docs)
    tok, eos = tokenizer_and_eos(cfg)
    dtype = token_dtype(tok.get_vocab_size())
    frac = heldout_fraction(cfg)
    tok_sha = sha256_file(tok.source_path)
    wanted = {
        "tokenizer_sha256": tok_sha,
        "heldout_fraction": frac,
        "sources": [{"name": s.name, "path": str(Path(s.path).resolve()),
                     "manifest_sha256": sha256_file(Path(s.path) / "manifest.json") if s.scrubbed else None}
                    for s in sources],
    }
    index_path = out / INDEX_NAME
    if index_path.is_file():
        try:
            old = json.loads(index_path.read_text())
            if {k: old.get(k) for k in ("tokenizer_sha256", "heldout_fraction")} == {k: wanted[k] for k in ("tokenizer_sha256", "heldout_fraction")} \
                    and [{k: s.get(k) for k in ("name", "path", "manifest_sha256")} for s in old.get("sources", [])] == wanted["sources"]:
                log.info("pretokenize: %s is up to date", index_path)
                return 0
        except ValueError:
            pass
    start, total = time.perf_counter(), 0
    index = {"format_version": 1, "dtype": dtype.name, "vocab_size": tok.get_vocab_size(), "eos_id": eos,
             "tokenizer": tok.source_path, **wanted, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for s, entry in zip(sources, index["sources"], strict=True):
        entry["weight"] = s.weight
        entry["shards"] = []
        (out / s.name).mkdir(parents=True, exist_ok=True)
        if s.manifest is not None:
            (out / "manifests").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(s.path) / "manifest.json", out / "manifests" / f"{s.name}.json")
            entry["config_hash"] = s.manifest.get("config_hash")
        for si, shard in enumerate(s.shards):
            ids, texts = s.reader.read(si, 0, shard.rows)
            keep = [t for i, t in zip(ids, texts, strict=True)
                    if isinstance(t, str) and t and not is_heldout(i, frac)]
            rel = f"{s.name}/{si:05d}.bin"
            tmp = out / f"{rel}.tmp"
            n_tokens = 0
            with open(tmp, "wb") as f:
                for b in range(0, len(keep), 256):
                    for enc in tok.encode_batch(keep[b:b + 256], add_special_tokens=False):
                        arr = np.empty(len(enc.ids) + 1, dtype=dtype)
                        arr[:-1] = enc.ids
                        arr[-1] = eos
                        f.write(arr.tobytes())
                        n_tokens += len(arr)
            os.replace(tmp, out / rel)
            entry["shards"].append({"path": rel, "tokens": n_tokens, "docs": len(keep), "source_shard": str(shard.path)})
            total += n_tokens
    write_text_atomic(index_path, json.dumps(index, indent=2) + "\n")
    log.info("pretokenize: %d tokens (%s) in %.1fs -> %s", total, dtype.name, time.perf_counter() - start, out)
    return 0
