"""Byte-level BPE trained on scrubbed text only, with the separator and PII placeholders as atoms.

`train_tokenizer(cfg)` streams documents from the scrub output (`tokenizer.input`; the privacy
gate applies) into Hugging Face `tokenizers`' BPE trainer, so the corpus is never held in memory.
``<|endoftext|>`` (the document separator) and one token per PII placeholder (``<|email|>``, ...)
are *special* tokens: the pre-tokenizer never splits them and they are never merged into
neighbours, so a redacted span costs exactly one token and the model can learn what it stands for.

`load_tokenizer(path)` accepts this file or any existing Hugging Face ``tokenizer.json``;
`separator_id(tok)` finds the end-of-document token the loader packs with.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from data_pipelines.loading.sources import Source
from data_pipelines.scrub.filters.pii_types import DOCUMENT_SEPARATOR, PLACEHOLDERS
from pretrain.errors import UserError
from pretrain.fileio import write_text_atomic

log = logging.getLogger(__name__)

# Tried in order when looking for the end-of-document token of a foreign tokenizer.json.
SEPARATOR_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "[SEP]")


def special_tokens(manifest: dict | None = None) -> list[str]:
    """The separator first (id 0), then one token per PII placeholder (ours and the manifest's)."""
    tokens = [DOCUMENT_SEPARATOR, *PLACEHOLDERS.values()]
    if manifest:
        tokens += sorted((manifest.get("pii") or {}).get("placeholders", {}).values())
    return list(dict.fromkeys(tokens))


def _documents(source, max_docs: int) -> Iterator[str]:
    """Every document, or with ``max_docs`` exactly that many spread evenly over the whole corpus.

    Systematic sampling by global row index: the first N documents would train the vocabulary on
    the first shards alone (one source, one period of a crawl). Row g is picked when
    floor((g + 1) * m / total) steps past floor(g * m / total); chunks holding no picked row are
    never read.
    """
    total = source.rows
    m = total if not max_docs or max_docs >= total else max_docs
    first = 0  # global index of the chunk's first row
    for chunk_id, chunk in enumerate(source.chunks):
        n = chunk.end - chunk.start
        if (first + n) * m // total == first * m // total:
            first += n
            continue  # nothing picked in this chunk
        _, texts = source.read_chunk(chunk_id)
        for g, text in enumerate(texts, start=first):
            if (g + 1) * m // total != g * m // total and isinstance(text, str) and text:
                yield text
        first += n


def build_bpe(vocab_size: int, min_frequency: int, specials: list[str]):
    """An untrained byte-level BPE tokenizer and its trainer (GPT-2 style, no prefix space)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    return tok, trainer


def train_tokenizer(cfg) -> int:
    """`python -m data_pipelines train-tokenizer`: BPE on `tokenizer.input`, written to `tokenizer.output`."""
    t = cfg.tokenizer
    source = Source("tokenizer", t.input, 1.0, "text", "tokenizer.input", cfg.data.require_scrubbed, 256)
    specials = special_tokens(source.manifest)
    if t.vocab_size < 256 + len(specials):
        raise UserError(f"tokenizer.vocab_size ({t.vocab_size}) must be at least 256 bytes + {len(specials)} special tokens")
    tok, trainer = build_bpe(t.vocab_size, t.min_frequency, specials)
    start = time.perf_counter()
    length = min(source.rows, t.max_docs) if t.max_docs else source.rows
    tok.train_from_iterator(_documents(source, t.max_docs), trainer=trainer, length=length)
    out = Path(t.output)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "tokenizer.json"
    tmp = out / f".tokenizer.json.tmp.{os.getpid()}"
    tok.save(str(tmp))
    os.replace(tmp, target)
    # For Hugging Face interop (export, AutoTokenizer): which token ends a document.
    write_text_atomic(out / "tokenizer_config.json", json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": specials[0],
        "bos_token": specials[0],
        "unk_token": None,
        "additional_special_tokens": specials[1:],
        "model_max_length": cfg.model.max_seq_len,
        "clean_up_tokenization_spaces": False,
    }, indent=2) + "\n")
    log.info("tokenizer: %d tokens (%d special) trained on %s in %.1fs -> %s",
             tok.get_vocab_size(), len(specials), t.input, time.perf_counter() - start, target)
    if tok.get_vocab_size() > cfg.model.vocab_size:
        log.warning("tokenizer has %d tokens but model.vocab_size is %d: raise model.vocab_size",
                    tok.get_vocab_size(), cfg.model.vocab_size)
    return 0


def load_tokenizer(path: str | os.PathLike):
    """Any Hugging Face tokenizer.json (a file, or a directory holding one) as a `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer

    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise UserError(f"tokenizer file {p} not found (train one with `python -m data_pipelines train-tokenizer`, "
                        "or point data.tokenizer at an existing tokenizer.json)")
    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises plain Exceptions for malformed files
        raise UserError(f"tokenizer file {p} cannot be loaded: {e}") from None
    tok.no_padding()
    tok.no_truncation()
    tok.source_path = str(p)  # type: ignore[attr-defined]
    return tok


def separator_id(tok) -> int:
    """Id of the end-of-document token: ours, or the first known EOS-like special token."""
    path = Path(getattr(tok, "source_path", "tokenizer.json"))
    config = path.with_name("tokenizer_config.json")
    candidates = list(SEPARATOR_CANDIDATES)
    if config.is_file():
        try:
            eos = json.loads(config.read_text()).get("eos_token")
            if isinstance(eos, dict):
                eos = eos.get("content")
            if isinstance(eos, str):
                candidates.insert(0, eos)
        except ValueError:
            pass
    for token in candidates:
        tid = tok.token_to_id(token)
        if tid is not None:
            return tid
    raise UserError(f"tokenizer {path} has no end-of-document token (looked for {', '.join(candidates)})")
