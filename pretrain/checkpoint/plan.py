"""What a resume will do, decided before anything is loaded.

Three decisions, all plain data so they can be broadcast from rank 0 and unit-tested:

* :func:`choose_checkpoint` (rank 0, from ``checkpoint.resume`` and the directory): which step
  directory, if any, and which later checkpoints ``checkpoint.overwrite`` deletes -> ResumeChoice;
* :func:`check_settings` (every rank, from the checkpoint's resolved config and this one): is this
  the same run? Every setting that differs is classified by :data:`RULES` as refused (the weights,
  the optimizer state or the loader's position cannot mean the same thing), allowable (refused
  unless ``checkpoint.allow_changes`` names it: a deliberate change such as a new tokenizer) or
  named (it may change, and the log says what changed and what follows from it);
* :func:`plan_resume` (every rank, from the verified checkpoint's metadata): same or changed world,
  universal conversion or not, loader states as saved, resharded or missing -> ResumePlan.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pretrain.checkpoint.format import (
    CheckpointError,
    TokenizerRef,
    find_latest_complete,
    is_complete,
    list_checkpoints,
    read_latest_pointer,
    read_marker,
    resolve_checkpoint,
)
from pretrain.monitor import METRICS_FILE

log = logging.getLogger(__name__)


# ResumePlan.loader
LOADER_AS_SAVED = "as_saved"  # same world and streams per rank: each rank takes its own saved state
LOADER_RESHARD = "reshard"  # world or data.num_workers changed: reshard_states remaps every rank's state
LOADER_MISSING = "missing"  # changed, and some rank saved no loader state: the loader starts without one


@dataclass(frozen=True)
class ResumeChoice:
    """Rank 0's answer to checkpoint.resume; the same object reaches every rank."""

    step_dir: Path | None = None  # None: start fresh
    delete_after: int | None = None  # delete checkpoints past this step first (checkpoint.overwrite=true)
    error: str | None = None  # refuse, with this message, on every rank


@dataclass(frozen=True)
class ResumePlan:
    """How a verified checkpoint is loaded into this run."""

    step_dir: Path
    saved_world: int
    world: int
    saved_stage: int
    stage: int
    universal: bool  # convert the ZeRO shards to DeepSpeed's universal format and load that
    loader: str  # LOADER_AS_SAVED, LOADER_RESHARD or LOADER_MISSING
    saved_workers: int | None  # loader streams per rank at save time (None: not recorded)
    workers: int  # loader streams per rank now

    @property
    def world_changed(self) -> bool:
        return self.saved_world != self.world


def choose_checkpoint(ckpt_dir: Path, mode: str, overwrite: bool, run_dir: Path) -> ResumeChoice:
    """checkpoint.resume (never | auto | a path) and checkpoint.overwrite -> ResumeChoice."""
    if mode == "never":
        existing = [p.name for _, p in list_checkpoints(ckpt_dir)]
        metrics = run_dir / METRICS_FILE
        if (existing or metrics.is_file()) and not overwrite:
            what = f"{ckpt_dir} already holds checkpoints ({existing[-1]} is the newest)" if existing else \
                f"run.dir already holds a run ({metrics})"
            return ResumeChoice(error=f"checkpoint.resume=never but {what}: set checkpoint.resume=auto to continue that "
                                "run, checkpoint.overwrite=true to start over (deleting its checkpoints and metrics), "
                                "or choose another run.dir")
        return ResumeChoice(delete_after=-1 if existing else None)
    if mode == "auto":
        latest = find_latest_complete(ckpt_dir)
        skipped = [p.name for s, p in list_checkpoints(ckpt_dir) if latest is None or s > int(latest.name[5:])]
        if skipped:
            log.warning("ignoring incomplete checkpoint(s) %s in %s (interrupted saves)", ", ".join(skipped), ckpt_dir)
        pointer = read_latest_pointer(ckpt_dir)
        if latest is not None and pointer is not None and pointer != latest.name:
            log.warning("%s names %s but the newest complete checkpoint is %s; using the latter",
                        ckpt_dir / "latest", pointer, latest.name)
        return ResumeChoice(step_dir=latest)
    try:
        path = resolve_checkpoint(mode)
    except CheckpointError as e:
        return ResumeChoice(error=f"checkpoint.resume={mode}: {e}")
    # Checkpoints in our directory past the one we branch from belong to an abandoned future:
    # left there, a later resume=auto (a requeue) would continue from them, and this run's
    # save of the same step would be mistaken for them.
    step = int(read_marker(path).get("step", -1))
    newer = [q for s, q in list_checkpoints(ckpt_dir) if s > step and q.resolve() != path.resolve() and is_complete(q)]
    if newer and not overwrite:
        return ResumeChoice(error=f"checkpoint.resume={mode} starts from step {step}, but checkpoint.dir {ckpt_dir} "
                            f"holds later checkpoints ({', '.join(q.name for q in newer)}): set checkpoint.resume=auto "
                            "to continue from the newest, checkpoint.overwrite=true to delete the later ones and "
                            "branch, or choose another checkpoint.dir")
    return ResumeChoice(step_dir=path, delete_after=step if newer else None)


# ---- is this the same run? ------------------------------------------------------------------

REFUSED = "refused"  # exit 2: the checkpoint cannot continue under this value
ALLOWABLE = "allowable"  # refused unless checkpoint.allow_changes names the key; then logged
NAMED = "named"  # may change; logged with what follows from it
ALLOWED = "allowed"  # SettingChange.verdict of an allowable change that checkpoint.allow_changes names


@dataclass(frozen=True)
class Rule:
    """How a resume treats a changed setting, and why (said in the refusal or the log)."""

    key: str  # dotted key; `[]` stands for any item of a list of named items (data.sources[].path)
    kind: str  # REFUSED, ALLOWABLE or NAMED
    why: str
    mode: str | None = None  # holds only under this data.mode (None: under both)
    if_allowed: str = ""  # ALLOWABLE: what follows when checkpoint.allow_changes allows it (default: why)


_WEIGHTS = "the checkpoint's weights are shaped and laid out for it"
_NEXT_STEP = "the config's value applies from the next step: the optimizer settings and the learning-rate " \
             "schedule are taken from the config, at the checkpoint's step"
_STREAMING_SEQ_LEN = (
    "the loader continues at the exact token where it stopped: each stream's saved position is the document "
    "it was packing and the token offset inside it, so that document resumes mid-way and every token from "
    "there on is packed into rows of the new data.seq_len + 1 (each row overlapping the next by one token); "
    "nothing is skipped or repeated, positions restart at 0 in every row as before, and the tokens per step "
    "change with the length")

# Every setting a resume treats specially; any other setting of the run may change and is named in
# the log. Not compared at all: the sections of other commands (tokenizer, scrub, bench) and how
# this invocation resumes (checkpoint.resume, overwrite, allow_changes). The world size and
# deepspeed.zero_stage may change (elastic resume): plan_resume decides how to load them.
RULES: tuple[Rule, ...] = (
    *(Rule(f"model.{k}", REFUSED, _WEIGHTS) for k in (
        "vocab_size", "vocab_multiple_of", "n_layers", "n_heads", "n_kv_heads", "d_model", "ffn_hidden",
        "ffn_multiple_of", "tie_embeddings")),
    Rule("train.precision", REFUSED, "DeepSpeed writes the optimizer state in files laid out per precision "
         "(bf16 and fp16 keep fp32 master weights); resume with the checkpoint's precision (auto resolves per device)"),
    Rule("optim.decay_norms", REFUSED, "it decides which parameters share an optimizer group, and the saved "
         "optimizer state is laid out per group"),
    Rule("optim.decay_embeddings", REFUSED, "it decides which parameters share an optimizer group, and the saved "
         "optimizer state is laid out per group"),
    Rule("run.seed", REFUSED, "the data order is drawn from it and the loader's saved position is a place in "
         "that order"),
    Rule("data.mode", REFUSED, "the loader's saved position is a streaming cursor or a pretokenized sample "
         "index, not both"),
    Rule("data.sources", REFUSED, "the loader's saved position is kept per source, by name and in this order"),
    Rule("data.shuffle", REFUSED, "the loader's saved position is a place in the shuffled chunk order",
         mode="streaming"),
    Rule("data.chunk_docs", REFUSED, "the loader's saved position counts chunks of data.chunk_docs documents",
         mode="streaming"),
    Rule("data.sources[].text_field", REFUSED, "the loader's saved offset inside a document counts tokens of "
         "that field's text", mode="streaming"),
    Rule("data.seq_len", REFUSED, "the pretokenized loader's saved position indexes windows of data.seq_len + 1 "
         "tokens", mode="pretokenized"),
    Rule("train.micro_batch_size", REFUSED, "the pretokenized loader's saved position is checked against the "
         "micro-batch size it was taken with", mode="pretokenized"),
    Rule("data.tokenizer", ALLOWABLE, "compared by content: under another tokenizer the same ids mean other tokens",
         if_allowed="the loader continues at the same documents, but the offset into the document each stream was "
         "packing counts tokens of the checkpoint's tokenizer; checkpoints from here on keep the new tokenizer"),
    Rule("data.val_fraction", ALLOWABLE, "it moves documents between training and validation: a larger fraction "
         "validates on documents already trained on",
         if_allowed="evaluations from here on use another validation set"),
    Rule("model.rope_theta", ALLOWABLE, "positions would be encoded otherwise than the weights learned them "
         "(deliberate when scaling the RoPE base for a longer context)"),
    Rule("model.norm_eps", ALLOWABLE, "every RMSNorm would compute another function than the weights were fit to"),
    Rule("data.seq_len", NAMED, _STREAMING_SEQ_LEN, mode="streaming"),
    Rule("data.sources[].path", NAMED, "a moved corpus is no change: the loader compares the data itself (chunks "
         "per source) and refuses another corpus"),
    Rule("data.sources[].weight", NAMED, "sources are drawn with the new weights from here on"),
    Rule("data.validation", NAMED, "validation reads other documents: evaluation figures before and after are "
         "not comparable"),
    Rule("model.max_seq_len", NAMED, "the RoPE table is computed, not saved: positions up to the new length"),
    Rule("model.doc_masking", NAMED, "tokens attend within other spans than before: losses before and after are "
         "not comparable"),
    Rule("model.reset_positions", NAMED, "tokens get other positions than before: losses before and after are "
         "not comparable"),
    Rule("model.init_std", NAMED, "it only initializes weights: no effect on a resume"),
    Rule("deepspeed.fp16_initial_scale_power", NAMED, "only the first loss scale: a resume continues with the "
         "checkpoint's"),
    *(Rule(f"optim.{k}", NAMED, _NEXT_STEP) for k in (
        "lr", "min_lr", "schedule", "warmup_steps", "decay_fraction", "weight_decay", "beta1", "beta2", "eps")),
    Rule("train.grad_clip", NAMED, _NEXT_STEP),
    Rule("train.max_steps", NAMED, "the learning-rate schedule spans the new horizon, evaluated at the "
         "checkpoint's step"),
    Rule("train.max_tokens", NAMED, "the learning-rate schedule spans the new horizon, evaluated at the "
         "checkpoint's step"),
)

_NOT_COMPARED_SECTIONS = ("tokenizer", "scrub", "bench")  # settings of other commands
_NOT_COMPARED = ("checkpoint.resume", "checkpoint.overwrite", "checkpoint.allow_changes")  # how this run resumes


@dataclass(frozen=True)
class SettingChange:
    """One setting that differs between the checkpoint's config and this one."""

    key: str
    saved: Any
    now: Any
    verdict: str  # REFUSED, ALLOWED (allowable and named in checkpoint.allow_changes) or NAMED
    why: str = ""

    def describe(self) -> str:
        text = f"{self.key}: checkpoint {_shown(self.saved)}, config {_shown(self.now)}"
        return f"{text} ({self.why})" if self.why else text


def _shown(value: Any) -> str:
    if isinstance(value, TokenizerRef):
        return value.describe()
    return value if isinstance(value, str) else json.dumps(value, default=str)


def run_settings(cfg: dict, tokenizer: TokenizerRef | None) -> dict[str, Any]:
    """A resolved config (as a dict) -> the settings a resume compares, by dotted key.

    Lists of named items (data.sources, data.validation) become their names under the list's key
    plus ``key[name].field`` per item, so a source is matched by name, not by position. The
    tokenizer is its content (``tokenizer``), not data.tokenizer's path; None: not comparable.
    """
    flat: dict[str, Any] = {}

    def walk(key: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{key}.{k}" if key else str(k), v)
        elif isinstance(node, list) and node and all(isinstance(x, dict) and "name" in x for x in node):
            flat[key] = [x["name"] for x in node]
            for item in node:
                for k, v in item.items():
                    if k != "name":
                        walk(f"{key}[{item['name']}].{k}", v)
        else:
            flat[key] = node

    walk("", {k: v for k, v in cfg.items() if k not in _NOT_COMPARED_SECTIONS})
    for key in _NOT_COMPARED:
        flat.pop(key, None)
    flat["data.tokenizer"] = tokenizer
    return flat


def _rule(key: str, mode: str | None) -> Rule | None:
    generic = re.sub(r"\[[^\]]*\]", "[]", key)
    return next((r for r in RULES if r.key == generic and r.mode in (None, mode)), None)


def setting_changes(saved: dict[str, Any], now: dict[str, Any], allow: Sequence[str] = ()) -> list[SettingChange]:
    """Every setting that differs between two :func:`run_settings`, classified by :data:`RULES`.

    A key missing on one side is not compared: a setting the checkpoint's version did not have, or
    a field of a source that only one side lists (the list's names already differ then). A
    tokenizer compares by content; one side without a tokenizer file is not comparable.
    """
    mode = now.get("data.mode")
    changes = []
    for key in (k for k in now if k in saved):
        before, after = saved[key], now[key]
        if isinstance(before, TokenizerRef) or isinstance(after, TokenizerRef):
            if before is None or after is None or before.sha256 == after.sha256:
                continue
        elif before == after:
            continue
        rule = _rule(key, mode)
        kind, why = (rule.kind, rule.why) if rule else (NAMED, "")
        if kind == ALLOWABLE and key in allow:
            kind, why = ALLOWED, rule.if_allowed or why
        elif kind == ALLOWABLE:
            kind, why = REFUSED, f"{why}; set checkpoint.allow_changes=[{key}] to change it deliberately"
        changes.append(SettingChange(key, before, after, kind, why))
    return changes


def check_settings(step_dir: Path, saved: dict[str, Any], now: dict[str, Any],
                   allow: Sequence[str] = ()) -> list[SettingChange]:
    """The changes a resume may make (ALLOWED and NAMED), or CheckpointError naming every refused
    one on its own line: the key, the checkpoint's value, the config's value and why."""
    changes = setting_changes(saved, now, allow)
    refused = [c.describe() for c in changes if c.verdict == REFUSED]
    if len(refused) == 1:
        raise CheckpointError(f"checkpoint {step_dir} cannot be resumed with this config: {refused[0]}")
    if refused:
        raise CheckpointError(f"checkpoint {step_dir} cannot be resumed with this config:\n  " + "\n  ".join(refused))
    return changes


def plan_resume(step_dir: Path, meta: dict, loader_states: list, world: int, stage: int, num_workers: int,
                param_dtype: str | None = None) -> ResumePlan:
    """The checkpoint's meta.json and per-rank loader states + this run's world, ZeRO stage,
    data.num_workers and parameter dtype (pretrain.engine.precision_path) -> ResumePlan;
    CheckpointError when the combination cannot be resumed."""
    saved_world, saved_stage = int(meta["world_size"]), int(meta["zero_stage"])
    # ZeRO-0 saves the optimizer as it is: its layout follows the parameters' dtype. Checkpoints
    # written before ZeRO-0 bf16 kept fp32 parameters under autocast record only the precision.
    saved_params = meta.get("param_dtype", meta.get("precision"))
    if param_dtype is not None and saved_stage == stage == 0 and saved_params != param_dtype:
        raise CheckpointError(
            f"checkpoint {step_dir} holds a ZeRO-0 optimizer for {saved_params} parameters, but this version trains "
            f"ZeRO-0 {meta.get('precision')} with {param_dtype} parameters (bf16 under autocast): its optimizer state "
            "cannot be loaded. Resume it with the version that wrote it, or start a new run from its weights "
            "(pretrain export)"
        )
    # ZeRO-3 partitions parameters, ZeRO-1/2 do not: switching between them reshapes the shards too.
    elastic = saved_world != world or (saved_stage == 3) != (stage == 3)
    if elastic and 0 in (saved_stage, stage) and saved_stage != stage:
        raise CheckpointError(
            f"checkpoint {step_dir} was written with deepspeed.zero_stage={saved_stage}; resuming it with "
            f"deepspeed.zero_stage={stage} is not supported (use the same stage, or both >= 1)"
        )
    # Loader streams per rank: data.num_workers may change on resume as well as the world size.
    saved_workers = loader_states[0].get("workers") if isinstance(loader_states[0], dict) else None
    workers = max(1, num_workers)
    if saved_world == world and saved_workers in (None, workers):
        loader = LOADER_AS_SAVED
    elif all(s is not None for s in loader_states):
        loader = LOADER_RESHARD
    else:
        loader = LOADER_MISSING
    return ResumePlan(step_dir=step_dir, saved_world=saved_world, world=world, saved_stage=saved_stage, stage=stage,
                      universal=elastic and saved_stage > 0, loader=loader, saved_workers=saved_workers,
                      workers=workers)
