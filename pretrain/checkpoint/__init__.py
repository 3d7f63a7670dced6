"""Checkpoints that survive anything: atomic saves, verified loads, exact and elastic resume.

    format.py        on-disk layout, completion marker, the one verification chain, list, prune
    state.py         TrainState and RNG capture/restore (JSON, no pickle)
    plan.py          what a resume does: which checkpoint (ResumeChoice), how to load it (ResumePlan)
    checkpointer.py  Checkpointer: due / save / resume, the collective protocol
    weights.py       consolidated fp32 weights and the checkpoint's config (export, generate),
                     universal conversion for elastic resume

Fault injection at named points of the save protocol lives in :mod:`pretrain.faults`.
"""

from pretrain.checkpoint.checkpointer import Checkpointer
from pretrain.checkpoint.format import (
    CONFIG_FILE,
    ENGINE_TAG,
    FORMAT,
    FORMAT_VERSION,
    LATEST,
    MARKER,
    META,
    TOKENIZER_FILE,
    UNIVERSAL_TAG,
    CheckpointError,
    TokenizerRef,
    find_latest_complete,
    is_complete,
    list_checkpoints,
    prune,
    read_marker,
    read_tokenizer,
    resolve_checkpoint,
    saved_tokenizer,
    step_dir_name,
    verify_checkpoint,
)
from pretrain.checkpoint.plan import ResumeChoice, ResumePlan, choose_checkpoint, plan_resume
from pretrain.checkpoint.state import TrainState, rng_state, set_rng_state
from pretrain.checkpoint.weights import (
    consolidated_state_dict,
    convert_to_universal,
    load_checkpoint_config,
)
from pretrain.faults import FAULT_ENV

__all__ = [
    "CONFIG_FILE", "ENGINE_TAG", "FAULT_ENV", "FORMAT", "FORMAT_VERSION", "LATEST", "MARKER", "META", "TOKENIZER_FILE",
    "UNIVERSAL_TAG", "CheckpointError", "Checkpointer", "ResumeChoice", "ResumePlan", "TokenizerRef", "TrainState",
    "choose_checkpoint", "consolidated_state_dict", "convert_to_universal", "find_latest_complete", "is_complete",
    "list_checkpoints", "load_checkpoint_config", "plan_resume", "prune", "read_marker", "read_tokenizer",
    "resolve_checkpoint", "rng_state", "saved_tokenizer", "set_rng_state", "step_dir_name", "verify_checkpoint",
]
