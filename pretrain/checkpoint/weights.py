"""Checkpoint weights outside of training: one consolidated fp32 state dict for export and
generate, the checkpoint's own config, and the universal conversion an elastic resume needs."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from pretrain.checkpoint.format import (
    CONFIG_FILE,
    ENGINE_TAG,
    UNIVERSAL_TAG,
    CheckpointError,
    hash_files,
    read_meta,
    verify_checkpoint,
    write_marker,
)
from pretrain.config import Config, load_config
from pretrain.dist import select_accelerator
from pretrain.fileio import fsync_dir

log = logging.getLogger(__name__)

_WRAPPER_PARTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def _clean_key(k: str) -> str:
    for part in _WRAPPER_PARTS:
        k = k.replace(part, "")
    return k.removeprefix("module.")


def load_checkpoint_config(step_dir: str | os.PathLike) -> Config:
    """The resolved config a checkpoint was written with, for the world size it was written on."""
    step_dir = Path(step_dir)
    meta = read_meta(step_dir)
    return load_config(step_dir / CONFIG_FILE, world_size=int(meta["world_size"]))


def consolidated_state_dict(step_dir: str | os.PathLike, verify: bool = True) -> dict[str, torch.Tensor]:
    """The model's full fp32 weights from a verified checkpoint of any ZeRO stage."""
    step_dir = Path(step_dir)
    if verify:
        verify_checkpoint(step_dir)
    engine_dir = step_dir / ENGINE_TAG
    if list(engine_dir.glob("*optim_states.pt")):
        # deepspeed loads only when a sharded checkpoint is read, after choosing its accelerator
        select_accelerator()
        from deepspeed.utils import zero_to_fp32

        sd = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=ENGINE_TAG)
    else:  # ZeRO-0: the full module lies in the model-states file
        files = sorted(engine_dir.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise CheckpointError(f"{engine_dir} holds no model states file")
        sd = torch.load(files[0], map_location="cpu", weights_only=True)["module"]
    return {_clean_key(k): v.detach().float().contiguous() for k, v in sd.items()}


def convert_to_universal(step_dir: str | os.PathLike) -> Path:
    """``ds_to_universal`` on ``step_dir/engine`` -> ``step_dir/universal`` (atomic via marker)."""
    select_accelerator()  # deepspeed loads only for an elastic resume, after choosing its accelerator
    from deepspeed.checkpoint import ds_to_universal

    step_dir = Path(step_dir)
    udir = step_dir / UNIVERSAL_TAG
    if udir.exists():
        shutil.rmtree(udir)
    t0 = time.monotonic()
    args = argparse.Namespace(
        input_folder=str(step_dir / ENGINE_TAG), output_folder=str(udir), num_extract_workers=1,
        num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True,
    )
    ds_to_universal.main(args)
    files = hash_files(udir, sorted(p.relative_to(udir).as_posix() for p in udir.rglob("*") if p.is_file()))
    fsync_dir(udir)
    write_marker(udir, files, universal=True)
    log.info("converted %s to a universal checkpoint in %.1fs", step_dir, time.monotonic() - t0)
    return udir
