"""What a checkpoint holds besides the engine's tensors: training progress and every RNG.

Both are JSON (no pickle anywhere in our files) and live in each rank's ``rank_NNNNN.json``.
"""

from __future__ import annotations

import base64
import dataclasses
import random
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class TrainState:
    """Our training progress; JSON-serializable and identical on every rank."""

    step: int = 0
    tokens_seen: int = 0
    wandb_run_id: str | None = None
    skipped_steps: int = 0
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> TrainState:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict:
    """Every RNG a training step may touch, JSON-serializable."""
    py = random.getstate()
    npst = np.random.get_state()
    out = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])],
        "torch": _b64(torch.get_rng_state()),
        "cuda": None,
    }
    if torch.cuda.is_available():
        out["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(d: dict) -> None:
    """Restore what :func:`rng_state` captured; CUDA states per device when the count matches."""
    v, st, gauss = d["python"]
    random.setstate((v, tuple(st), gauss))
    name, keys, pos, has_gauss, cached = d["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(d["torch"]))
    if d.get("cuda") and torch.cuda.is_available():
        states = [_unb64(s) for s in d["cuda"]]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
        else:
            torch.cuda.set_rng_state(states[0])
