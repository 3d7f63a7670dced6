"""Pretokenized mode: the memmap loader over `python -m data_pipelines pretokenize` output.

The loader (`PretokenizedLoader`) cuts each shard into samples of seq_len + 1 tokens overlapping
by one. Global sample ``g`` of the job picks a source with a counter-based seeded draw (weights
from `data.sources`); the ``k``-th draw of source ``s`` is its sample ``perm(seed, s, k // N_s)
[k % N_s]`` (a fresh permutation each epoch). Data-parallel rank ``r`` of ``n`` takes global
samples ``[g + r*mb, g + (r+1)*mb)`` of each global batch. The state is the next global sample
index and the per-source draw counts, identical on every rank, so restoring is O(1) and a
different world size simply continues from the same global index (elastic by construction).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from torch.utils.data import IterableDataset

from data_pipelines.loading.common import (
    STATE_VERSION,
    MixDraw,
    check_state,
    every_rank,
    shutdown_workers,
    worker_iter,
)
from data_pipelines.loading.packing import make_batch
from data_pipelines.loading.pretokenize import INDEX_NAME
from pretrain.errors import UserError
from pretrain.fileio import sha256_file

log = logging.getLogger(__name__)

_TAG_MIX, _TAG_PERM = 21, 22


@functools.lru_cache(maxsize=8)
def _epoch_perm(seed: int, src: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, _TAG_PERM, src, epoch]).permutation(n)


def draw_numbers(choices: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per drawn source: its draw number (its draws before the block + its occurrences earlier in it)."""
    k = np.empty(len(choices), dtype=np.int64)
    for s in range(len(counts)):
        m = choices == s
        k[m] = counts[s] + np.arange(int(m.sum()))
    return k


def _check_pretokenized_sources(d, index: dict, root: Path) -> list[str]:
    """The privacy gate for pretokenized data: every source must still be the scrub it was made
    from (same path and manifest), and an unscrubbed one needs data.require_scrubbed=false (as in
    streaming mode). Returns the paths of the unscrubbed sources."""
    configured = {s.name: str(Path(s.path).resolve()) for s in d.sources}
    unscrubbed = []
    for s in index["sources"]:
        if configured[s["name"]] != s["path"]:
            raise UserError(f"data.sources {s['name']!r} is {configured[s['name']]} but {root} was pretokenized from "
                            f"{s['path']}; rerun `python -m data_pipelines pretokenize`")
        if s.get("manifest_sha256"):
            manifest = Path(s["path"]) / "manifest.json"
            if not manifest.is_file() or sha256_file(manifest) != s["manifest_sha256"]:
                raise UserError(f"{manifest} changed or is missing since {root} was pretokenized (the scrub was "
                                "redone); rerun `python -m data_pipelines pretokenize`")
        elif d.require_scrubbed:
            raise UserError(f"data.pretokenized_dir ({root}) holds source {s['name']!r} ({s['path']}) pretokenized "
                            "without a scrub manifest; the loader reads only scrubbed data. Scrub it and rerun "
                            "pretokenize, or set data.require_scrubbed=false (the run records it).")
        else:
            unscrubbed.append(s["path"])
    if unscrubbed:
        log.warning("training on unscrubbed pretokenized sources (data.require_scrubbed=false): %s", ", ".join(unscrubbed))
    return unscrubbed


class PretokenizedLoader:
    """Same interface and batch format as the streaming `TrainLoader`, over pretokenized shards."""

    def __init__(self, cfg, rank: int, world: int):
        d = cfg.data
        root = Path(d.pretokenized_dir)
        try:
            self.index = json.loads((root / INDEX_NAME).read_text())
        except FileNotFoundError:
            raise UserError(f"data.pretokenized_dir: {root / INDEX_NAME} not found; run "
                            "`python -m data_pipelines pretokenize` first") from None
        except ValueError as e:
            raise UserError(f"data.pretokenized_dir: {root / INDEX_NAME} is corrupt: {e}") from None
        if Path(d.tokenizer).is_file() and sha256_file(d.tokenizer) != self.index["tokenizer_sha256"]:
            raise UserError(f"data.pretokenized_dir ({root}) was written with another tokenizer than data.tokenizer "
                            f"({d.tokenizer}); rerun `python -m data_pipelines pretokenize`")
        if self.index["vocab_size"] > cfg.model.vocab_size:
            raise UserError(f"data.pretokenized_dir ({root}) holds ids of a {self.index['vocab_size']}-token vocabulary, "
                            f"more than model.vocab_size ({cfg.model.vocab_size})")
        weights = {s.name: s.weight for s in d.sources}
        names = [s["name"] for s in self.index["sources"]]
        if sorted(weights) != sorted(names):
            raise UserError(f"data.sources names {sorted(weights)} do not match the pretokenized sources {sorted(names)} "
                            f"in {root}; rerun `python -m data_pipelines pretokenize`")
        self.unscrubbed_sources = _check_pretokenized_sources(d, self.index, root)
        self.root, self.rank, self.world = root, rank, world
        self.L, self.mb, self.seed = d.seq_len, cfg.train.micro_batch_size, cfg.run.seed
        self.num_workers, self.prefetch = d.num_workers, d.prefetch
        self.W = max(1, d.num_workers)
        self.dtype = np.dtype(self.index["dtype"])
        self.eos = int(self.index["eos_id"])
        # per source: shard paths and cumulative sample counts
        self.shards, self.cum = [], []
        for s in self.index["sources"]:
            counts = [max(0, (sh["tokens"] - 1) // self.L) for sh in s["shards"]]
            self.shards.append([root / sh["path"] for sh in s["shards"]])
            self.cum.append(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))
            if self.cum[-1][-1] == 0:
                raise UserError(f"pretokenized source {s['name']} in {root} has fewer than data.seq_len + 1 tokens")
        self.n_samples = [int(c[-1]) for c in self.cum]
        self.weights = [weights[n] for n in names]
        self.g, self.counts = 0, [0] * len(names)
        self.next_local, self.batches_done = 0, 0
        self._it: Iterator | None = None
        self._dl_iter = None
        self._maps: dict[tuple[int, int], np.memmap] = {}

    # -- reading ------------------------------------------------------------------------------
    def _window(self, src: int, sample: int) -> np.ndarray:
        shard = int(np.searchsorted(self.cum[src], sample, side="right") - 1)
        off = (sample - int(self.cum[src][shard])) * self.L
        m = self._maps.get((src, shard))
        if m is None:
            m = self._maps[(src, shard)] = np.memmap(self.shards[src][shard], dtype=self.dtype, mode="r")
        return m[off:off + self.L + 1]

    def _batches(self, g0: int, counts0: list[int], slot: int) -> Iterator[tuple]:
        """Local batches slot, slot+W, ... from global index g0: (batch, local slot, state after)."""
        import torch

        mix = MixDraw([self.seed, _TAG_MIX], self.weights)
        per_global = self.world * self.mb
        g, counts, t = g0, np.asarray(counts0, dtype=np.int64), 0
        while True:
            c = mix.choices(g, per_global)
            k = draw_numbers(c, counts)
            if t % self.W == slot:
                lo = self.rank * self.mb
                windows = np.empty((self.mb, self.L + 1), dtype=np.int64)
                for j in range(self.mb):
                    src, draw = int(c[lo + j]), int(k[lo + j])
                    epoch, i = divmod(draw, self.n_samples[src])
                    sample = int(_epoch_perm(self.seed, src, epoch, self.n_samples[src])[i])
                    windows[j] = self._window(src, sample)
                batch = {k2: torch.from_numpy(v) for k2, v in make_batch(windows, self.eos).items()}
            counts = counts + np.bincount(c, minlength=len(self.n_samples))
            g += per_global
            if t % self.W == slot:
                yield batch, slot, {"g": g, "counts": counts.tolist()}
            t += 1

    def __iter__(self) -> PretokenizedLoader:
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._it = self._start()
        batch, slot, state = next(self._it)
        self.g, self.counts = state["g"], state["counts"]
        self.batches_done += 1
        return batch

    def _start(self) -> Iterator[tuple]:
        if self.num_workers == 0:
            return self._batches(self.g, self.counts, 0)
        self._dl_iter = worker_iter(_PretokWorkers(self, self.g, list(self.counts)), self.num_workers, self.prefetch)
        return self._dl_iter

    def close(self) -> None:
        it, self._dl_iter, self._it = self._dl_iter, None, None
        shutdown_workers(it)

    def __getstate__(self):  # sent to workers without open memmaps or iterators
        st = dict(self.__dict__)
        st.update(_maps={}, _it=None, _dl_iter=None)
        return st

    # -- state --------------------------------------------------------------------------------
    def _fingerprint(self) -> dict:
        return {"seed": self.seed, "seq_len": self.L, "samples": self.n_samples,
                "sources": [s["name"] for s in self.index["sources"]]}

    def state_dict(self) -> dict:
        return {"format": "pretrain.loader", "version": STATE_VERSION, "mode": "pretokenized",
                "rank": self.rank, "world": self.world, "workers": self.W, "micro_batch": self.mb,
                "batches": self.batches_done, "g": self.g, "counts": list(self.counts), **self._fingerprint()}

    def load_state_dict(self, d: dict) -> None:
        check_state(d, "pretokenized", self.rank, self.world)
        mine = self._fingerprint()
        for k in mine:
            if d[k] != mine[k]:
                raise UserError(f"loader state does not match the pretokenized data ({k}: state has {d[k]!r}, "
                                f"now {mine[k]!r})")
        if d["micro_batch"] != self.mb:
            raise UserError(f"loader state was saved with train.micro_batch_size={d['micro_batch']}, now {self.mb}")
        self.close()
        self.g, self.counts, self.batches_done = int(d["g"]), list(d["counts"]), int(d["batches"])


class _PretokWorkers(IterableDataset):
    """IterableDataset body: worker `slot` produces local batches slot, slot + W, ..."""

    def __init__(self, loader: PretokenizedLoader, g: int, counts: list[int]):
        self.loader, self.g, self.counts = loader, g, counts

    def __iter__(self):
        import torch

        info = torch.utils.data.get_worker_info()
        yield from self.loader._batches(self.g, self.counts, info.id if info else 0)


def reshard_pretokenized(states: list[dict], new_world: int) -> list[dict]:
    """Every rank holds the same global position; a new world continues from it."""
    states = every_rank(states)
    first = states[0]
    if any((s["g"], s["counts"]) != (first["g"], first["counts"]) for s in states):
        raise UserError("pretokenized loader states of the ranks disagree on the global sample index")
    return [{**first, "rank": r, "world": new_world} for r in range(new_world)]
