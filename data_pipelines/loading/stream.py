"""The training loader: sharded, shuffled, mixed, packed, and exactly resumable from a tiny state.

Work assignment
---------------
Each source's documents are cut into *chunks* (`data.chunk_docs` consecutive rows of one shard,
see :mod:`data_pipelines.loading.sources`). A rank runs ``W = max(1, data.num_workers)`` *streams* (one per
DataLoader worker); the ``S = world * W`` streams of the job have global ids ``s = rank * W + w``.
In epoch ``e`` the chunks of source ``i`` are put in a seeded order ``perm(seed, i, e)`` and
stream ``s`` takes ``perm[s::S]``: the streams of an epoch cover every chunk exactly once, so no
document is read twice or skipped. Inside a chunk, rows are read in a seeded order
``perm(seed, i, e, chunk)`` (this plus the chunk order is the shuffle; no buffer state). Each
source runs its own endless epochs. Several sources are mixed per document: draw ``n`` of stream
``s`` picks a source with probability proportional to its weight, from a counter-based generator
seeded by ``(seed, S, s, n // 4096)``, so the mixing state is the draw counter.

State
-----
Per stream: the draw counter and, per source, a cursor ``{"epoch": e, "next": k, "pending":
[[epoch, chunk, row, skip], ...]}``: first finish the pending pieces (a piece is "rows ``row..``
of ``chunk`` in the chunk's shuffled order, dropping the first ``skip`` tokens of the first usable
document"), then continue with chunk ``k`` of this stream's list for epoch ``e``. The packing buffer
is not stored: the state is the cursor position *before the first document still in the buffer*,
with that document's already-emitted tokens as ``skip``. Restoring re-reads at most one chunk per
source and re-tokenizes the buffered documents: its cost does not depend on how far the run got.
With workers, every batch carries its worker's state back to the main process, which keeps the
latest per stream plus which worker delivers next (workers are rotated on restore so the next
batch comes from the right one).

Elastic resume (`reshard_stream_states`)
---------------------------------
From the states of all ``S`` old streams, per source: every pending piece, plus every chunk that
the old dealing assigned to a stream for epochs up to the highest epoch any old stream has
reached (``E_max``) and that the stream has not started, becomes a pending piece. The pieces are
dealt round-robin (ordered by epoch) to the ``S'`` new streams, whose normal dealing then starts at
epoch ``E_max + 1`` with ``S'`` streams. Every token of every epoch is thus emitted exactly once
across the resize; only the mixing and shuffle order after the resize differ from an
uninterrupted run (same world size: the continuation is bit-identical).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator

import numpy as np
from torch.utils.data import IterableDataset

from data_pipelines.loading.common import (
    STATE_VERSION,
    MixDraw,
    check_state,
    every_rank,
    heldout_fraction,
    shutdown_workers,
    tokenizer_and_eos,
    worker_iter,
)
from data_pipelines.loading.packing import Packer, make_batch
from data_pipelines.loading.sources import Source, is_heldout, open_sources
from pretrain.errors import UserError

log = logging.getLogger(__name__)

_TAG_CHUNKS, _TAG_ROWS, _TAG_MIX = 11, 12, 13


# ------------------------------------------------------------------------------------------------
# Deterministic orders (pure functions of the seed, never of the world size except the dealing).
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _epoch_order(seed: int, src: int, epoch: int, n_chunks: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(n_chunks)
    return np.random.default_rng([seed, _TAG_CHUNKS, src, epoch]).permutation(n_chunks)


def deal(seed: int, src: int, epoch: int, n_chunks: int, shuffle: bool, stream: int, streams: int) -> np.ndarray:
    """Chunk ids of source `src` that stream `stream` of `streams` reads in `epoch`, in order."""
    return _epoch_order(seed, src, epoch, n_chunks, shuffle)[stream::streams]


def _row_order(seed: int, src: int, epoch: int, chunk: int, n: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, _TAG_ROWS, src, epoch, chunk]).permutation(n)


def _normalized(cursor: tuple, dealer) -> tuple:
    """The same position with a non-empty pending list (deal the next chunk if needed)."""
    epoch, nxt, pending = cursor
    while not pending:
        lst = dealer(epoch)
        if nxt < len(lst):
            pending = ((epoch, int(lst[nxt]), 0, 0),)
            nxt += 1
        else:
            epoch, nxt = epoch + 1, 0
    return epoch, nxt, pending


def _cursor_from_json(c: dict) -> tuple:
    return int(c["epoch"]), int(c["next"]), tuple(tuple(int(x) for x in p) for p in c["pending"])


def _cursor_to_json(c: tuple) -> dict:
    return {"epoch": c[0], "next": c[1], "pending": [list(p) for p in c[2]]}


def initial_stream_state(stream: int, streams: int, n_sources: int) -> dict:
    return {"stream": stream, "streams": streams, "draws": 0,
            "sources": [{"epoch": 0, "next": 0, "pending": []} for _ in range(n_sources)]}


# ------------------------------------------------------------------------------------------------
# One stream: documents in a deterministic order from a resumable position.
# ------------------------------------------------------------------------------------------------


def check_enough_chunks(source: Source, streams: int) -> None:
    """Every stream must get at least one chunk of every source per epoch (else it would have no
    data of that source and its epochs would never advance): an error that says what would work."""
    if len(source.chunks) >= streams:
        return
    rows = source.rows
    if rows >= streams:  # sum(ceil(rows_i / c)) >= rows / c >= streams for c <= rows // streams
        fix = f"set data.chunk_docs <= {rows // streams} or lower data.num_workers"
    else:
        fix = "use fewer ranks or data.num_workers, or leave this source out"
    raise UserError(
        f"{source.key} ({source.path}) has {len(source.chunks)} chunks of data.chunk_docs documents ({rows} documents), "
        f"fewer than the {streams} loader streams (ranks x max(1, data.num_workers)); {fix}"
    )


class DocStream:
    """The documents of one stream (mixing + per-source cursors), resumable from a stream state.

    keep: "train" skips documents held out for validation, "val" keeps only those, "all" keeps all.
    """

    def __init__(self, sources: list[Source], state: dict, seed: int, shuffle: bool,
                 heldout_fraction: float = 0.0, keep: str = "train"):
        self.sources, self.seed, self.shuffle = sources, seed, shuffle
        self.stream, self.streams = int(state["stream"]), int(state["streams"])
        self.draws = int(state["draws"])
        self.cursors = [_cursor_from_json(c) for c in state["sources"]]
        self.frac, self.keep = heldout_fraction, keep
        self.mix = MixDraw([seed, _TAG_MIX, self.streams, self.stream], [s.weight for s in sources])
        self._chunk_cache: dict[int, tuple[tuple, list, list, np.ndarray]] = {}
        for s in sources:
            check_enough_chunks(s, self.streams)

    def dealer(self, src: int):
        n = len(self.sources[src].chunks)
        return lambda epoch: deal(self.seed, src, epoch, n, self.shuffle, self.stream, self.streams)

    def snapshot(self) -> tuple:
        return self.draws, tuple(self.cursors)

    def _chunk(self, src: int, epoch: int, chunk: int) -> tuple[list, list, np.ndarray]:
        key = (epoch, chunk)
        hit = self._chunk_cache.get(src)
        if hit is None or hit[0] != key:
            ids, texts = self.sources[src].read_chunk(chunk)
            order = _row_order(self.seed, src, epoch, chunk, len(ids), self.shuffle)
            ids = [ids[i] for i in order]
            texts = [texts[i] for i in order]
            ok = np.array([isinstance(t, str) and bool(t) for t in texts])
            if self.keep != "all" and self.frac > 0:
                held = np.array([is_heldout(d, self.frac) for d in ids])
                ok &= held if self.keep == "val" else ~held
            hit = self._chunk_cache[src] = (key, ids, texts, ok)
        return hit[1], hit[2], hit[3]

    def _next_from(self, src: int) -> tuple[str, int, tuple]:
        """The next usable document of `src`: (text, skip, cursor pointing at it)."""
        dealer = self.dealer(src)
        misses, limit = 0, self.sources[src].rows + 1
        while True:
            at = epoch, nxt, pending = _normalized(self.cursors[src], dealer)
            pe, chunk, row, skip = pending[0]
            ids, texts, ok = self._chunk(src, pe, chunk)
            good = bool(ok[row])
            carry = 0 if good else skip
            if row + 1 < len(ids):
                pending = ((pe, chunk, row + 1, carry),) + pending[1:]
            else:
                pending = pending[1:]
                if carry:  # the document the skip belongs to lies further on
                    epoch, nxt, pending = _normalized((epoch, nxt, pending), dealer)
                    p0 = pending[0]
                    pending = ((p0[0], p0[1], p0[2], carry),) + pending[1:]
            self.cursors[src] = (epoch, nxt, pending)
            if good:
                return texts[row], skip, at
            misses += 1
            if misses > limit:
                raise UserError(f"{self.sources[src].key} ({self.sources[src].path}) has no usable documents "
                                f"for {'validation' if self.keep == 'val' else 'training'}")

    def __iter__(self) -> Iterator[tuple]:
        """Yields (origin, text, skip).

        origin = (draw counter, cursors, source) positioned exactly at this document: the source's
        cursor points at the document's own row, so a token offset can be attached to that piece.
        """
        while True:
            draws, cursors = self.snapshot()
            src = self.mix.choose(self.draws)
            self.draws += 1
            text, skip, at = self._next_from(src)
            origin = (draws, cursors[:src] + (at,) + cursors[src + 1:], src)
            yield origin, text, skip

    def state_at(self, origin: tuple | None, offset: int) -> dict:
        """JSON state resuming at `origin` (a document's snapshot and source) with `offset` tokens emitted."""
        if origin is None:
            draws, cursors = self.snapshot()
        else:
            draws, cursors, src = origin
            cursors = list(cursors)
            e, n, pending = cursors[src]
            p0 = pending[0]
            cursors[src] = (e, n, ((p0[0], p0[1], p0[2], offset),) + pending[1:])
        return {"stream": self.stream, "streams": self.streams, "draws": draws,
                "sources": [_cursor_to_json(c) for c in cursors]}


class StreamSpec:
    """Everything a worker needs to build its stream (picklable: sent to DataLoader workers)."""

    def __init__(self, sources: list[Source], tokenizer, eos_id: int, seq_len: int, micro_batch: int,
                 seed: int, shuffle: bool, heldout_fraction: float):
        self.sources, self.tokenizer, self.eos_id = sources, tokenizer, eos_id
        self.seq_len, self.micro_batch, self.seed, self.shuffle = seq_len, micro_batch, seed, shuffle
        self.heldout_fraction = heldout_fraction

    def batches(self, state: dict) -> Iterator[tuple[dict, dict]]:
        """Endless (batch of numpy arrays, stream state after it) from a stream state."""
        docs = DocStream(self.sources, state, self.seed, self.shuffle, self.heldout_fraction, "train")
        packer = Packer(iter(docs), self.tokenizer, self.eos_id, self.seq_len)
        while True:
            batch = make_batch(packer.windows(self.micro_batch), self.eos_id)
            head = packer.head()
            yield batch, docs.state_at(*(head if head else (None, 0)))


# ------------------------------------------------------------------------------------------------
# The loader the trainer uses.
# ------------------------------------------------------------------------------------------------


def _to_torch(batch: dict) -> dict:
    import torch

    return {k: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v) for k, v in batch.items()}


class _WorkerStreams(IterableDataset):
    """IterableDataset: DataLoader worker `slot` runs local stream (slot + rotation) % W."""

    def __init__(self, spec: StreamSpec, states: list[dict], rotation: int):
        self.spec, self.states, self.rotation = spec, states, rotation

    def __iter__(self):
        import torch

        info = torch.utils.data.get_worker_info()
        slot = info.id if info is not None else 0
        local = (slot + self.rotation) % len(self.states)
        for batch, state in self.spec.batches(self.states[local]):
            yield _to_torch(batch), local, state


class TrainLoader:
    """Endless iterator of batch dicts (LongTensor [micro_batch, seq_len]) with exact state.

    `state_dict()` describes the position after the last batch handed out; `load_state_dict()`
    (before or between iterations) makes the next batch the one that would have followed.
    """

    def __init__(self, spec: StreamSpec, rank: int, world: int, num_workers: int, prefetch: int,
                 unscrubbed_sources: list[str], chunk_docs: int):
        self.spec, self.rank, self.world = spec, rank, world
        self.num_workers, self.prefetch, self.chunk_docs = num_workers, prefetch, chunk_docs
        self.W = max(1, num_workers)
        self.unscrubbed_sources = unscrubbed_sources
        n_src = len(spec.sources)
        self.streams = [initial_stream_state(rank * self.W + w, world * self.W, n_src) for w in range(self.W)]
        self.next_local = 0
        self.batches_done = 0
        self._it: Iterator | None = None
        self._dl_iter = None

    # -- iteration ------------------------------------------------------------------------------
    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._it = self._start()
        batch, local, state = next(self._it)
        self.streams[local] = state
        self.next_local = (local + 1) % self.W
        self.batches_done += 1
        return batch

    def _start(self) -> Iterator[tuple]:
        if self.num_workers == 0:
            return ((_to_torch(b), 0, s) for b, s in self.spec.batches(self.streams[0]))
        ds = _WorkerStreams(self.spec, [dict(s) for s in self.streams], self.next_local)
        self._dl_iter = worker_iter(ds, self.num_workers, self.prefetch)
        return self._dl_iter

    def close(self) -> None:
        """Stop worker processes (they restart on the next `next()`)."""
        it, self._dl_iter, self._it = self._dl_iter, None, None
        shutdown_workers(it)

    # -- state ----------------------------------------------------------------------------------
    def _fingerprint(self) -> dict:
        return {"seed": self.spec.seed, "shuffle": self.spec.shuffle, "chunk_docs": self.chunk_docs,
                "sources": [{"name": s.name, "chunks": len(s.chunks)} for s in self.spec.sources]}

    def state_dict(self) -> dict:
        return {"format": "pretrain.loader", "version": STATE_VERSION, "mode": "streaming",
                "rank": self.rank, "world": self.world, "workers": self.W, "next_worker": self.next_local,
                "batches": self.batches_done, **self._fingerprint(),
                "streams": [dict(s) for s in self.streams]}

    def load_state_dict(self, d: dict) -> None:
        check_state(d, "streaming", self.rank, self.world)
        if d["workers"] != self.W:
            raise UserError(f"loader state has {d['workers']} streams per rank but data.num_workers gives {self.W}; "
                            "convert it with reshard_states(states, world, num_workers)")
        mine = self._fingerprint()
        for k in ("seed", "shuffle", "chunk_docs", "sources"):
            if d[k] != mine[k]:
                raise UserError(f"loader state does not match this data configuration ({k}: state has {d[k]!r}, "
                                f"config gives {mine[k]!r}); the run's data changed since the checkpoint")
        self.close()
        self.streams = [dict(s) for s in d["streams"]]
        self.next_local = int(d["next_worker"])
        self.batches_done = int(d["batches"])


def build_stream_loader(cfg, dp_rank: int, dp_world: int, tokenizer=None) -> TrainLoader:
    """The streaming training loader of data-parallel rank `dp_rank` of `dp_world`."""
    d = cfg.data
    sources = open_sources(d.sources, "data.sources", d.require_scrubbed, d.chunk_docs)
    # the privacy gate covers validation sources too, before training starts
    val_sources = open_sources(d.validation, "data.validation", d.require_scrubbed, d.chunk_docs)
    tok, eos = tokenizer_and_eos(cfg, tokenizer)
    spec = StreamSpec(sources, tok, eos, d.seq_len, cfg.train.micro_batch_size, cfg.run.seed, d.shuffle,
                      heldout_fraction(cfg))
    unscrubbed = [s.path for s in sources + val_sources if not s.scrubbed]
    loader = TrainLoader(spec, dp_rank, dp_world, d.num_workers, d.prefetch, unscrubbed, d.chunk_docs)
    DocStream(sources, loader.streams[0], cfg.run.seed, d.shuffle)  # checks chunks >= streams now, not in a worker
    if unscrubbed:
        log.warning("training on unscrubbed sources (data.require_scrubbed=false): %s", ", ".join(unscrubbed))
    return loader


# ------------------------------------------------------------------------------------------------
# Validation: deterministic, finite, the same batches every evaluation.
# ------------------------------------------------------------------------------------------------


class ValLoader:
    """The first `train.eval_batches` batches of this rank's share of the held-out documents.

    Held-out documents (the `data.validation` sources, or the training documents whose id hash
    falls under `data.val_fraction`) are taken in file order and dealt to ranks round-robin; a rank
    cycles through its share when it needs more tokens than it holds. Built on first use, cached.
    """

    def __init__(self, sources: list[Source], tokenizer, eos_id: int, seq_len: int, micro_batch: int,
                 n_batches: int, rank: int, world: int, heldout_fraction: float, keep: str):
        self.sources, self.tok, self.eos = sources, tokenizer, eos_id
        self.L, self.mb, self.n, self.rank, self.world = seq_len, micro_batch, n_batches, rank, world
        self.frac, self.keep = heldout_fraction, keep
        self.unscrubbed_sources = [s.path for s in sources if not s.scrubbed]
        self._batches: list[dict] | None = None

    def _docs(self) -> list[str]:
        """This rank's held-out documents, reading only as far as the batches need."""
        need = self.n * self.mb * self.L + 1
        mine, every, seen_tokens_guess = [], [], 0
        i = 0
        for src in self.sources:
            for chunk in range(len(src.chunks)):
                ids, texts = src.read_chunk(chunk)
                for doc_id, text in zip(ids, texts, strict=True):
                    if not (isinstance(text, str) and text):
                        continue
                    if self.keep == "val" and not is_heldout(doc_id, self.frac):
                        continue
                    every.append(text)
                    if i % self.world == self.rank:
                        mine.append(text)
                        seen_tokens_guess += len(text) // 2  # ~2+ bytes per token: read a bit more than needed
                    i += 1
                if seen_tokens_guess > 2 * need:
                    return mine
        if not every:
            what = "data.validation sources" if self.keep == "all" else f"data.val_fraction={self.frac} of the training documents"
            raise UserError(f"no validation documents: {what} selects none; raise data.val_fraction or set data.validation")
        return mine or every

    def _build(self) -> list[dict]:
        docs = self._docs()

        def cycle():
            while True:
                for text in docs:
                    yield None, text, 0

        packer = Packer(cycle(), self.tok, self.eos, self.L)
        return [_to_torch(make_batch(packer.windows(self.mb), self.eos)) for _ in range(self.n)]

    def __iter__(self) -> Iterator[dict]:
        if self._batches is None:
            self._batches = self._build()
        return iter(self._batches)

    def __len__(self) -> int:
        return self.n


def build_val_loader(cfg, dp_rank: int, dp_world: int, tokenizer=None) -> ValLoader:
    """Validation batches of rank `dp_rank`, read from the sources in either data.mode (they are few)."""
    d = cfg.data
    if d.validation:
        sources = open_sources(d.validation, "data.validation", d.require_scrubbed, d.chunk_docs)
        frac, keep = 0.0, "all"
    else:
        sources = open_sources(d.sources, "data.sources", d.require_scrubbed, d.chunk_docs)
        frac, keep = d.val_fraction, "val"
        if frac <= 0:
            raise UserError("no validation data: set data.validation sources or data.val_fraction > 0 "
                            "(or train.eval_every=0)")
    tok, eos = tokenizer_and_eos(cfg, tokenizer)
    return ValLoader(sources, tok, eos, d.seq_len, cfg.train.micro_batch_size, cfg.train.eval_batches,
                     dp_rank, dp_world, frac, keep)


# ------------------------------------------------------------------------------------------------
# Elastic resume.
# ------------------------------------------------------------------------------------------------


def reshard_stream_states(states: list[dict], new_world: int, num_workers: int | None = None) -> list[dict]:
    """Streaming loader states of every old rank -> states for each of `new_world` ranks (see module doc).

    Pure function. `num_workers` defaults to the old streams per rank. No document (token) of any
    epoch is repeated or skipped across the resize.
    """
    by_rank = every_rank(states)
    first, world = by_rank[0], by_rank[0]["world"]
    W_new = max(1, num_workers) if num_workers is not None else first["workers"]
    S_old, S_new = world * first["workers"], new_world * W_new
    old = [st for s in by_rank for st in sorted(s["streams"], key=lambda x: x["stream"])]
    assert [st["stream"] for st in old] == list(range(S_old)), "stream ids must be 0..S-1"
    seed, shuffle = first["seed"], first["shuffle"]
    new_cursors: list[list[dict]] = [[] for _ in range(S_new)]
    for i, src in enumerate(first["sources"]):
        n_chunks = src["chunks"]
        if n_chunks < S_new:
            raise UserError(f"data source {src['name']} has {n_chunks} chunks, fewer than the {S_new} streams "
                            "after the resize; lower data.chunk_docs")
        cursors = [_cursor_from_json(st["sources"][i]) for st in old]
        e_max = max(c[0] for c in cursors)
        pieces: list[tuple] = []
        for s, (epoch, nxt, pending) in enumerate(cursors):
            pieces += pending
            for e in range(epoch, e_max + 1):
                lst = deal(seed, i, e, n_chunks, shuffle, s, S_old)
                pieces += [(e, int(c), 0, 0) for c in lst[(nxt if e == epoch else 0):]]
        # Epoch order first; within an epoch, started pieces first so buffers drain soonest.
        pieces.sort(key=lambda p: (p[0], p[2] == 0 and p[3] == 0))
        for s in range(S_new):
            mine = tuple(pieces[s::S_new])
            new_cursors[s].append(_cursor_to_json((e_max + 1, 0, mine)))
    out = []
    for r in range(new_world):
        streams = [{"stream": r * W_new + w, "streams": S_new, "draws": 0, "sources": new_cursors[r * W_new + w]}
                   for w in range(W_new)]
        out.append({**first, "rank": r, "world": new_world, "workers": W_new, "next_worker": 0, "streams": streams})
    return out
