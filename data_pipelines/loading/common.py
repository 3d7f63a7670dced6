"""What the streaming and the pretokenized loader share, so neither needs the other.

- the loader state envelope (`STATE_VERSION`, `check_state`, `every_rank` for a reshard);
- the tokenizer and its separator (`tokenizer_and_eos`) and the validation hold-out (`heldout_fraction`);
- the source-mixing draw (`MixDraw`): a counter-based seeded choice, so its state is a counter;
- DataLoader worker processes (`worker_iter`, `shutdown_workers`) that leave stop signals to the trainer.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator, Sequence

import numpy as np

from data_pipelines.tokenizer import load_tokenizer, separator_id
from pretrain.errors import UserError

STATE_VERSION = 1
MIX_BLOCK = 4096  # draws made per generator call; part of the data order, so fixed


# ------------------------------------------------------------------------------------------------
# State envelope
# ------------------------------------------------------------------------------------------------


def check_state(d: dict, mode: str, rank: int, world: int) -> None:
    """A loader state must be ours, of this version and data mode, and for this rank of this world."""
    if not isinstance(d, dict) or d.get("format") != "pretrain.loader" or d.get("version") != STATE_VERSION:
        raise UserError("loader state is not a version-1 pretrain.loader state")
    if d["mode"] != mode:
        raise UserError(f"loader state is for data.mode={d['mode']} but data.mode is {mode}")
    if d["world"] != world or d["rank"] != rank:
        raise UserError(f"loader state is for rank {d['rank']} of {d['world']}, this is rank {rank} of {world}; "
                        "convert the states of all ranks with reshard_states() (elastic resume)")


def every_rank(states: list[dict]) -> list[dict]:
    """The loader states of ranks 0..world-1 of one run, in rank order (a reshard needs them all)."""
    if not states:
        raise UserError("reshard_states needs the loader state of every old rank, got none")
    world = states[0]["world"]
    by_rank = sorted(states, key=lambda s: s["rank"])
    if [s["rank"] for s in by_rank] != list(range(world)) or any(s["world"] != world for s in by_rank):
        raise UserError(f"reshard_states needs the states of ranks 0..{world - 1} of one run, "
                        f"got ranks {[s['rank'] for s in states]}")
    return by_rank


# ------------------------------------------------------------------------------------------------
# Tokenizer and hold-out
# ------------------------------------------------------------------------------------------------


def tokenizer_and_eos(cfg, tokenizer=None) -> tuple:
    """(tokenizer, separator id): `tokenizer` if given, else data.tokenizer; it must fit model.vocab_size."""
    tok = tokenizer if tokenizer is not None else load_tokenizer(cfg.data.tokenizer)
    if tok.get_vocab_size() > cfg.model.vocab_size:
        raise UserError(f"data.tokenizer ({cfg.data.tokenizer}) has {tok.get_vocab_size()} tokens, more than "
                        f"model.vocab_size ({cfg.model.vocab_size}); raise model.vocab_size")
    return tok, separator_id(tok)


def heldout_fraction(cfg) -> float:
    """Share of training documents held out for validation: none when data.validation names sources."""
    return 0.0 if cfg.data.validation else cfg.data.val_fraction


# ------------------------------------------------------------------------------------------------
# Source mixing
# ------------------------------------------------------------------------------------------------


class MixDraw:
    """Draw ``n`` picks a source with probability proportional to its weight.

    Draws come in blocks of `MIX_BLOCK` from a generator seeded by ``(*key, n // MIX_BLOCK)``, so
    any draw is reachable from its counter alone (resume is O(1)); `key` tells the callers apart
    (a tag, and for the streaming loader the stream).
    """

    def __init__(self, key: Sequence[int], weights: Sequence[float]):
        self.key = [int(k) for k in key]
        w = np.asarray(weights, dtype=np.float64)
        self.p = w / w.sum()
        self._block: tuple[int, np.ndarray] | None = None

    def choices(self, start: int, count: int) -> np.ndarray:
        """Sources of draws start .. start + count - 1."""
        if len(self.p) == 1:
            return np.zeros(count, dtype=np.int64)
        out = np.empty(count, dtype=np.int64)
        done = 0
        while done < count:
            block, off = divmod(start + done, MIX_BLOCK)
            if self._block is None or self._block[0] != block:
                rng = np.random.default_rng([*self.key, block])
                self._block = (block, rng.choice(len(self.p), size=MIX_BLOCK, p=self.p))
            take = min(count - done, MIX_BLOCK - off)
            out[done:done + take] = self._block[1][off:off + take]
            done += take
        return out

    def choose(self, draw: int) -> int:
        """Source of draw `draw`."""
        return int(self.choices(draw, 1)[0])


# ------------------------------------------------------------------------------------------------
# Worker processes
# ------------------------------------------------------------------------------------------------


def _identity(x):
    return x


def worker_iter(dataset, num_workers: int, prefetch: int) -> Iterator:
    """Iterator over the IterableDataset `dataset` run in `num_workers` DataLoader processes (items as is)."""
    import torch  # lazy: torch loads only when a loader starts workers (data commands stay light)
    from torch.utils.data import DataLoader  # lazy: as above

    dl = DataLoader(dataset, batch_size=None, num_workers=num_workers, collate_fn=_identity,
                    prefetch_factor=prefetch, pin_memory=torch.cuda.is_available(),
                    worker_init_fn=ignore_stop_signals)
    return iter(dl)


def ignore_stop_signals(_worker_id: int) -> None:
    """Workers leave SIGTERM/SIGUSR1 to the trainer.

    A preemption signal reaches every process of the job step (SLURM signals all of them, and
    launch/slurm.sbatch forwards SIGUSR1 with `scancel --signal`); if it killed the
    workers, the trainer would die on a broken loader before it could finish its step and save.
    Workers still exit with the trainer: torch's watchdog stops them when their parent is gone.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def shutdown_workers(it: Iterator | None) -> None:
    """Stop the worker processes of a `worker_iter` iterator now (not at garbage collection)."""
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
