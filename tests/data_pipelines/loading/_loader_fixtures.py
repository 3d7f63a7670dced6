"""Tiny scrubbed corpora and a word-level tokenizer whose token ids identify (document, word).

Every word of document k is ``d<k>w<j>``, a token of its own, so a token id says exactly which
document and position it came from: coverage tests can check every token of every document.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data_pipelines.scrub.filters.pii_types import DOCUMENT_SEPARATOR, PLACEHOLDERS
from data_pipelines.scrub.manifest import shard_entry, shard_name, write_manifest


def doc_text(prefix: str, k: int) -> str:
    n = 1 + (k * 7919) % 37  # 1..37 words: shorter and longer than a window
    return " ".join(f"{prefix}{k}w{j}" for j in range(n))


def write_scrubbed(out: Path, prefix: str = "d", n_docs: int = 60, shards: int = 2, fmt: str = "parquet",
                   row_group: int = 7) -> dict[str, str]:
    """A scrub-style output dir (shards + manifest.json); returns {doc id: text}."""
    out.mkdir(parents=True, exist_ok=True)
    docs = {f"{prefix}-{k}": doc_text(prefix, k) for k in range(n_docs)}
    items = list(docs.items())
    entries = []
    per = -(-n_docs // shards)
    for r in range(shards):
        part = items[r * per:(r + 1) * per]
        rel = shard_name(0, r, fmt)
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        cols = {"id": [i for i, _ in part], "text": [t for _, t in part],
                "source": ["test"] * len(part), "meta": ["{}"] * len(part)}
        if fmt == "parquet":
            pq.write_table(pa.table(cols), out / rel, compression="zstd", row_group_size=row_group)
        else:
            import zstandard

            lines = "".join(json.dumps(dict(zip(cols, vals, strict=True))) + "\n" for vals in zip(*cols.values(), strict=True))
            (out / rel).write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
        entries.append(shard_entry(out, rel, len(part)))
    write_manifest(out, {"config_hash": "test", "shards": entries,
                         "documents": {"read": n_docs, "kept": n_docs, "dropped": 0},
                         "pii": {"placeholders": dict(PLACEHOLDERS), "counts": {}},
                         "filters": {}, "inputs": []})
    return docs


def write_word_tokenizer(path: Path, corpora: list[dict[str, str]]) -> Path:
    """A WordLevel tokenizer.json over every word of the corpora (+ separator and placeholders)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {DOCUMENT_SEPARATOR: 0, "[UNK]": 1}
    for ph in PLACEHOLDERS.values():
        vocab[ph] = len(vocab)
    for docs in corpora:
        for text in docs.values():
            for w in text.split():
                vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def token_table(tokenizer_path: Path) -> dict[int, tuple[str, int]]:
    """token id -> (document word prefix like 'd17', word index) for corpus words."""
    vocab = json.loads(Path(tokenizer_path).read_text())["model"]["vocab"]
    out = {}
    for w, i in vocab.items():
        if "w" in w and w[0].isalpha() and not w.startswith(("<", "[")):
            doc, _, j = w.rpartition("w")
            out[i] = (doc, int(j))
    return out


SEQ, MB = 16, 2


def make_corpus(root: Path) -> dict:
    """Source a: 60 documents in 2 parquet shards; source b: 30 in one jsonl.zst shard."""
    a = write_scrubbed(root / "a", "d", n_docs=60, shards=2)
    b = write_scrubbed(root / "b", "m", n_docs=30, shards=1, fmt="jsonl.zst")
    tok = write_word_tokenizer(root / "tok" / "tokenizer.json", [a, b])
    return {"root": root, "a": a, "b": b, "tok": tok, "table": token_table(tok)}


def make_cfg(corpus: dict, *extra: str, mix: bool = False, val_fraction: float = 0.0):
    """Loader config over the corpus: seq_len 16, micro-batch 2, 4-document chunks; b mixed in 1:3."""
    from pretrain.config import load_config

    srcs = f"{{name: a, path: {corpus['root'] / 'a'}, weight: 3.0}}"
    if mix:
        srcs += f", {{name: b, path: {corpus['root'] / 'b'}, weight: 1.0}}"
    return load_config(None, [f"data.sources=[{srcs}]", f"data.tokenizer={corpus['tok']}", f"data.seq_len={SEQ}",
                              f"train.micro_batch_size={MB}", "data.chunk_docs=4", f"data.val_fraction={val_fraction}",
                              "train.eval_every=0", *extra])


def doc_len(corpus: dict, doc_id: str) -> int:
    src = "a" if doc_id.startswith("d") else "b"
    return len(corpus[src][doc_id].split()) + 1  # words + separator


def stream_ids(batches: list[dict]) -> list[int]:
    """The token stream a loader stream emitted: windows overlap by one, so each input is one token."""
    return [t for b in batches for row in b["input_ids"].tolist() for t in row]


def split_streams(batches: list[dict], streams: int, first: int = 0) -> list[list[dict]]:
    """A rank's batches per local stream: with W workers they come from streams first, first+1, ... (mod W)."""
    out: list[list[dict]] = [[] for _ in range(streams)]
    for n, b in enumerate(batches):
        out[(first + n) % streams].append(b)
    return out


def words(corpus: dict, ids: list[int], prefix: str) -> list[tuple[str, int]]:
    """(doc id, word index) of every token of source `prefix` ('d' = a, 'm' = b) in `ids`; separators dropped."""
    table = corpus["table"]
    return [(f"{prefix}-{table[t][0][1:]}", table[t][1]) for t in ids if t in table and table[t][0][0] == prefix]


def find_epoch_cover(fixed: list[list], open_: list[list], expected: set, starts) -> bool:
    """True if the units in `fixed` plus a prefix of each sequence in `open_` hold every unit of
    `expected` exactly once, each prefix ending where `starts(unit)` (a document start) or at the end.

    A stream emits its share of an epoch before any of the next epoch, and the next epoch begins
    with a new document, so this is what "no repeat, no skip" means when only the emitted tokens
    are known: `fixed` are sequences known to lie inside the epoch, `open_` may run past it.
    """
    used: set = set()
    for seq in fixed:
        for u in seq:
            if u in used or u not in expected:
                return False
            used.add(u)

    def search(i: int) -> bool:
        if i == len(open_):
            return len(used) == len(expected)
        seq, added = open_[i], []
        try:
            for c in range(len(seq) + 1):
                if (c == len(seq) or starts(seq[c])) and search(i + 1):
                    return True
                if c == len(seq) or seq[c] in used or seq[c] not in expected:
                    return False  # a longer prefix repeats or strays: no cut of this stream further on
                used.add(seq[c])
                added.append(seq[c])
            return False
        finally:
            used.difference_update(added)

    return search(0)


def training_words(corpus: dict, name: str, doc_ids) -> set:
    """Every (doc id, word index) of the given documents of source `name`."""
    return {(d, j) for d in doc_ids for j in range(len(corpus[name][d].split()))}


def assert_epoch_covered(corpus: dict, fixed: list[list[int]], open_: list[list[int]], expected: dict) -> None:
    """Per source ({'a': doc ids, 'b': doc ids}): every word of every expected document exactly once in the
    epoch, judged from token ids alone (`fixed`/`open_` token streams as in `find_epoch_cover`)."""
    for name, doc_ids in expected.items():
        prefix = "d" if name == "a" else "m"
        want = training_words(corpus, name, doc_ids)
        fx = [words(corpus, s, prefix) for s in fixed]
        op = [words(corpus, s, prefix) for s in open_]
        if not find_epoch_cover(fx, op, want, lambda u: u[1] == 0):
            seen = {u for s in fx + op for u in s}
            fixed_words = [u for s in fx for u in s]
            raise AssertionError(
                f"source {name}: no end of epoch per stream gives every word of every document exactly once "
                f"(a skip or a repeat); never emitted: {sorted({d for d, _ in want - seen})[:10]}, "
                f"repeated inside the known epoch part: {len(fixed_words) - len(set(fixed_words))} words")
