"""Documents -> token stream joined by the separator -> windows of seq_len + 1 -> batches.

Windows overlap by one token (window i holds tokens [i*L, i*L + L + 1)), so every token is an
input exactly once and a label exactly once; nothing is padded, so no label is -100. Document
boundaries come from the separator positions (`boundaries`): the separator belongs to the document
it ends, `doc_ids` count documents within each row from 0 and `position_ids` restart at 0 at every
document start and at the start of every row (a document continued from the previous row starts
again at 0, which keeps positions below seq_len for the RoPE table).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


def boundaries(input_ids: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(position_ids, doc_ids) for a [B, T] array of packed token ids."""
    is_eos = input_ids == eos_id
    doc_ids = np.cumsum(is_eos, axis=1) - is_eos  # separators before t, not counting t itself
    t = np.arange(input_ids.shape[1])
    starts = np.zeros_like(is_eos)
    starts[:, 0] = True
    starts[:, 1:] = is_eos[:, :-1]
    last_start = np.maximum.accumulate(np.where(starts, t, 0), axis=1)
    return (t - last_start).astype(np.int64), doc_ids.astype(np.int64)


def make_batch(windows: np.ndarray, eos_id: int) -> dict[str, np.ndarray]:
    """[B, L+1] windows -> input_ids, labels (next tokens), position_ids, doc_ids, each [B, L]."""
    input_ids = np.ascontiguousarray(windows[:, :-1], dtype=np.int64)
    labels = np.ascontiguousarray(windows[:, 1:], dtype=np.int64)
    position_ids, doc_ids = boundaries(input_ids, eos_id)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "doc_ids": doc_ids}


class DocumentsExhausted(Exception):
    """A finite document stream ran out before the requested windows were complete."""


@dataclass
class Doc:
    """One document in the packing buffer; `origin` is whatever resumes the reader at this document."""

    tokens: np.ndarray  # token ids with the separator appended, minus the first `skip` tokens
    skip: int  # tokens of this document already emitted before the state it was read from
    origin: object


class Packer:
    """Cuts windows from a stream of documents, tokenizing them in batches with a fast tokenizer.

    `docs` yields (origin, text, skip): `skip` tokens of the document were already emitted
    (a resume inside a document). The buffer is never part of the state: `head()` tells where the
    first still-needed document starts (its origin and token offset), which is enough to rebuild it.
    """

    def __init__(self, docs: Iterator[tuple], tokenizer, eos_id: int, seq_len: int, tokenize_batch: int = 32):
        self.docs, self.tok, self.eos, self.L = docs, tokenizer, eos_id, seq_len
        self.tokenize_batch = tokenize_batch
        self.buf: deque[Doc] = deque()
        self.pos = 0  # offset of the next window's first token inside buf[0].tokens
        self.avail = 0  # tokens in the buffer from pos on
        self.docs_tokenized = 0

    def _fill(self, need: int) -> None:
        while self.avail < need:
            # Read about what is needed (~4 characters per token), at least ~16k tokens so the fast
            # tokenizer gets batches worth parallelising, at most tokenize_batch documents: the
            # read-ahead is what a restore re-tokenizes, so it stays small.
            items, chars = [], 0
            want = max(need - self.avail, 16_384) * 4
            for item in self.docs:
                items.append(item)
                chars += len(item[1])
                if len(items) >= self.tokenize_batch or chars >= want:
                    break
            if not items:
                raise DocumentsExhausted
            encs = self.tok.encode_batch([text for _, text, _ in items], add_special_tokens=False)
            for (origin, _, skip), enc in zip(items, encs, strict=True):
                ids = enc.ids
                arr = np.empty(len(ids) + 1, dtype=np.int64)
                arr[:-1] = ids
                arr[-1] = self.eos
                if skip:
                    arr = arr[skip:]
                if len(arr):
                    self.buf.append(Doc(arr, skip, origin))
                    self.avail += len(arr)
            self.docs_tokenized += len(items)

    def windows(self, n: int) -> np.ndarray:
        """The next n windows, [n, L+1]."""
        L = self.L
        self._fill(n * L + 1)
        out = np.empty((n, L + 1), dtype=np.int64)
        for i in range(n):
            row, filled, e, off = out[i], 0, 0, self.pos
            while filled < L + 1:
                d = self.buf[e]
                take = min(len(d.tokens) - off, L + 1 - filled)
                row[filled:filled + take] = d.tokens[off:off + take]
                filled += take
                off += take
                if off == len(d.tokens):
                    e, off = e + 1, 0
            self._advance(L)
        return out

    def _advance(self, n: int) -> None:
        self.avail -= n
        while n:
            rest = len(self.buf[0].tokens) - self.pos
            if n >= rest:
                n -= rest
                self.buf.popleft()
                self.pos = 0
            else:
                self.pos += n
                n = 0

    def head(self) -> tuple[object, int] | None:
        """(origin, token offset) of the first token still to be emitted, or None if the buffer is empty."""
        if not self.buf:
            return None
        d = self.buf[0]
        return d.origin, d.skip + self.pos
