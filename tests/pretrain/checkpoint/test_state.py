"""TrainState and the RNG snapshot stored in every rank file (JSON only)."""

from __future__ import annotations

import json
import random

import numpy as np
import torch

from pretrain.checkpoint.state import TrainState, rng_state, set_rng_state


def test_rng_state_is_json_and_round_trips():
    state = json.loads(json.dumps(rng_state()))
    a = (random.random(), np.random.rand(2).tolist(), torch.rand(2).tolist())
    set_rng_state(state)
    assert (random.random(), np.random.rand(2).tolist(), torch.rand(2).tolist()) == a


def test_train_state_from_dict_ignores_keys_of_other_versions():
    """A rank file written by a newer version may carry fields this one does not know."""
    d = {"step": 3, "tokens_seen": 12, "wandb_run_id": "r", "skipped_steps": 1, "extra": {"a": 1}, "future": True}
    assert TrainState.from_dict(d) == TrainState(step=3, tokens_seen=12, wandb_run_id="r", skipped_steps=1,
                                                 extra={"a": 1})
