"""`python -m pretrain audit CONFIG`: does the trained model reproduce the secrets planted in its
training data (``scrub.canaries``), and did the scrub keep the PII-shaped ones out?

For every canary of the scrub's registry, on the run's newest checkpoint (any ZeRO stage and world
size, consolidated by :func:`pretrain.checkpoint.consolidated_state_dict`):

- **score**: the log-perplexity of the secret given its prefix, -log2 p(secret tokens | prefix)
  summed over the secret's tokens, for the canary and for ``audit.references`` random secrets of
  the same space. Only the secret is scored: the prefix's own likelihood is the same for every
  candidate (the model is causal), so the whole sentence would rank them identically and shift
  every score by the same constant. The prefix is run once and its keys/values shared by a batch
  of candidates: one forward of the secret tokens per ``audit.batch_size`` candidates.
- **exposure**: by rank and by skew-normal extrapolation (:mod:`pretrain.exposure`).
- **extraction**: greedy decoding from the prefix reproduces the secret exactly.

Writes ``RUN_DIR/audit/memorization.json``, ``memorization.md`` and ``exposure.png``, prints the
table, and logs it to the run's wandb run (the same run id, resumed: no second run).
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from data_pipelines.scrub.canaries import Canary, Registry, read_registry, references, registry_path
from pretrain.checkpoint import (
    TOKENIZER_FILE,
    load_checkpoint_config,
    read_marker,
    resolve_checkpoint,
)
from pretrain.checkpoint.format import META, rank_file_name, read_meta
from pretrain.config import Config
from pretrain.errors import UserError
from pretrain.exposure import extrapolated_exposure, rank_exposure
from pretrain.fileio import write_json_atomic, write_text_atomic
from pretrain.generate import load_for_inference
from pretrain.model import KVCache, Transformer
from pretrain.monitor import WandbLogger, resolve_wandb_mode
from pretrain.sampling import generate

log = logging.getLogger(__name__)

AUDIT_DIR = "audit"
JSON_FILE = "memorization.json"
MARKDOWN_FILE = "memorization.md"
PLOT_FILE = "exposure.png"
SCORING = ("sum over the secret's tokens of -log2 p(token | prefix and earlier secret tokens); "
           "the prefix starts a document (position 0, no separator before it)")


# --------------------------------------------------------------------------------------------
# Scoring and extraction (pure functions of a model and a tokenizer: the tests call them directly)
# --------------------------------------------------------------------------------------------


def split_tokens(tok: Any, prefix: str, secrets: list[str]) -> tuple[list[int], list[list[int]]]:
    """Token ids of the prefix and of each secret, as the tokenizer splits ``prefix + secret``.

    The secret must start at a token boundary (every canary secret starts with a space, where a
    byte-level or metaspace pre-tokenizer always splits), so the shared prefix can be run once."""
    prefix_ids = tok.encode(prefix, add_special_tokens=False).ids
    tails = []
    for secret, enc in zip(secrets, tok.encode_batch([prefix + s for s in secrets], add_special_tokens=False),
                           strict=True):
        if enc.ids[: len(prefix_ids)] != prefix_ids or len(enc.ids) == len(prefix_ids):
            raise UserError(f"the tokenizer merges the end of the prefix {prefix!r} into the secret {secret!r}; "
                            "the audit needs the secret to start a new token")
        tails.append(enc.ids[len(prefix_ids):])
    return prefix_ids, tails


@torch.inference_mode()
def secret_bits(model: Transformer, prefix_ids: list[int], secrets: list[list[int]], batch_size: int) -> np.ndarray:
    """-log2 p(secret | prefix) of every secret (token ids), batched over candidates."""
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    P = len(prefix_ids)
    longest = P + max(len(s) for s in secrets)
    if longest > model.cfg.max_seq_len:
        raise UserError(f"a canary of {longest} tokens exceeds model.max_seq_len ({model.cfg.max_seq_len})")
    model.eval()
    shared = KVCache(model.cfg, 1, P, device, dtype)
    first = F.log_softmax(model(torch.tensor([prefix_ids], device=device), cache=shared)[0, -1].float(), -1)
    out = np.empty(len(secrets), dtype=np.float64)
    for start in range(0, len(secrets), batch_size):
        chunk = secrets[start : start + batch_size]
        S = max(len(s) for s in chunk)
        ids = torch.zeros(len(chunk), S, dtype=torch.long)
        mask = torch.zeros(len(chunk), S, dtype=torch.bool)
        for i, s in enumerate(chunk):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = True
        ids, mask = ids.to(device), mask.to(device)
        cache = KVCache(model.cfg, len(chunk), P + S, device, dtype)
        for layer in range(model.cfg.n_layers):  # the prefix's keys and values, once for every row
            cache.k[layer][:, :P] = shared.k[layer][:, :P]
            cache.v[layer][:, :P] = shared.v[layer][:, :P]
        cache.pos = P
        logp = F.log_softmax(model(ids, cache=cache)[:, :-1].float(), -1)  # predicts secret tokens 2..S
        nll = -first[ids[:, 0]]
        if S > 1:
            nll = nll - (logp.gather(-1, ids[:, 1:, None])[..., 0] * mask[:, 1:]).sum(-1)
        out[start : start + len(chunk)] = (nll / math.log(2)).double().cpu().numpy()
    return out


def greedy_continuation(model: Transformer, tok: Any, prefix_ids: list[int], n_tokens: int, eos_id: int | None) -> str:
    """The text greedy decoding produces after the prefix (n_tokens tokens, or up to the separator)."""
    new = generate(model, prefix_ids, max_new_tokens=n_tokens, temperature=0.0, eos_id=eos_id)
    return tok.decode(new, skip_special_tokens=False)


def audit_canary(model: Transformer, tok: Any, eos_id: int | None, canary: Canary, n_references: int, seed: int,
                 batch_size: int) -> dict:
    """Exposure (rank, extrapolated) and extraction of one canary; the fields of memorization.json."""
    refs = references(canary, n_references, seed)
    prefix_ids, tails = split_tokens(tok, canary.prefix, [canary.secret, *refs])
    bits = secret_bits(model, prefix_ids, tails, batch_size)
    exposure, rank = rank_exposure(bits[0], bits[1:])
    greedy = greedy_continuation(model, tok, prefix_ids, len(tails[0]) + 2, eos_id)
    return {
        "exposure_bits": {"rank": round(exposure, 4), "extrapolated": round(extrapolated_exposure(bits[0], bits[1:], canary.space_bits), 4)},
        "extracted": greedy.startswith(canary.secret),
        "rank": rank,
        "log_perplexity_bits": round(float(bits[0]), 4),
        "reference_median_bits": round(float(np.median(bits[1:])), 4),
        "greedy": greedy,
    }


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def _device(choice: str) -> str:
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("audit.device=cuda but no CUDA device is available")
    return "cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu"


def _check_registry_matches(registry: Registry, path: Path, step_dir: Path) -> None:
    """The registry must come from the scrub whose output this checkpoint trained on: otherwise
    every exposure would sit at chance and look like protection."""
    trained = [m.get("config_hash") for m in read_meta(step_dir).get("scrub_manifests", [])]
    if registry.config_hash not in trained:
        raise UserError(f"canary registry {path} belongs to a scrub (config hash {registry.config_hash[:12]}) that is "
                        f"not among the sources checkpoint {step_dir} trained on (hashes "
                        f"{[h[:12] if h else None for h in trained]}, in its {META}); set scrub.canaries.registry "
                        "to the registry of the training data's scrub")
    if registry.outcomes is None:
        raise UserError(f"canary registry {path} has no scrub outcomes: the scrub that wrote it did not finish")


def run_audit(cfg: Config) -> int:
    """`python -m pretrain audit`: audit the newest (or audit.checkpoint) checkpoint of the run."""
    a = cfg.audit
    t0 = time.perf_counter()
    step_dir = resolve_checkpoint(a.checkpoint or cfg.checkpoint.dir)
    reg_path = registry_path(cfg.scrub)
    registry = read_registry(reg_path)
    _check_registry_matches(registry, reg_path, step_dir)
    if not (step_dir / TOKENIZER_FILE).is_file():  # before the weights are read and consolidated
        raise UserError(f"checkpoint {step_dir} holds no {TOKENIZER_FILE}: cannot tokenize the canaries")
    device = _device(a.device)
    model, tok, eos_id = load_for_inference(step_dir, device)  # verified, consolidated from any ZeRO stage
    step = read_marker(step_dir).get("step")
    log.info("audit: %d canaries x %d references on %s (step %s, %s)", len(registry.canaries), a.references,
             step_dir, step, device)
    rows, details = [], {}
    for c in registry.canaries:
        t = time.perf_counter()
        r = audit_canary(model, tok, eos_id, c, a.references, a.seed, a.batch_size)
        rows.append({"id": c.id, "family": c.family, "kind": c.kind, "repetitions": c.repetitions,
                     "prefix": c.prefix, "secret": c.secret, "present_after_scrub": registry.present_after_scrub(c.id),
                     "exposure_bits": r["exposure_bits"], "extracted": r["extracted"],
                     "reference_count": a.references, "space_bits": round(c.space_bits, 4)})
        details[c.id] = {k: r[k] for k in ("rank", "log_perplexity_bits", "reference_median_bits", "greedy")}
        log.info("  %-24s exposure %5.2f bits (rank %d), extrapolated %5.2f, extracted %s (%.1fs)", c.id,
                 r["exposure_bits"]["rank"], r["rank"], r["exposure_bits"]["extrapolated"], r["extracted"],
                 time.perf_counter() - t)
    result = {
        "format": "memorization-audit", "format_version": 1,
        "checkpoint": str(step_dir.resolve()), "step": step, "registry": str(reg_path.resolve()),
        "reference_count": a.references, "reference_seed": a.seed, "scoring": SCORING,
        "exposure": {"rank": "log2(reference_count) - log2(1 + references scoring strictly lower)",
                     "extrapolated": "-log2 CDF of a skew-normal fitted to the references' scores, capped at space_bits"},
        "seconds": round(time.perf_counter() - t0, 1),
        "summary": summarize(rows),
        "canaries": rows,
        "details": details,  # per canary id: rank, scores, the greedy continuation
    }
    out = Path(cfg.run.dir) / AUDIT_DIR
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / JSON_FILE, result, indent=1, ensure_ascii=False)
    table = to_markdown(result)
    write_text_atomic(out / MARKDOWN_FILE, table)
    png = plot_exposure(result, out / PLOT_FILE)
    print(table, flush=True)
    log.info("audit written to %s (%s, %s, %s) in %.1fs", out, JSON_FILE, MARKDOWN_FILE, PLOT_FILE, result["seconds"])
    _log_to_wandb(cfg, step_dir, result, png)
    return 0


# --------------------------------------------------------------------------------------------
# Summary, table, plot, wandb
# --------------------------------------------------------------------------------------------


def summarize(rows: list[dict]) -> dict:
    """Per family and repetition level: canaries, median exposures, how many were extracted; and
    whether exposure rises with repetitions: rank medians strictly increasing level to level up to
    the rank's resolution (two levels both at log2 N are both "at least log2 N": no fall), and the
    Spearman rank correlation of exposure with repetitions over the family's canaries (levels
    whose canaries all sit at chance differ only by noise, which the correlation weighs)."""
    out: dict = {}
    for fam in sorted({r["family"] for r in rows}):
        levels = {}
        for n in sorted({r["repetitions"] for r in rows if r["family"] == fam}):
            rs = [r for r in rows if r["family"] == fam and r["repetitions"] == n]
            levels[str(n)] = {"canaries": len(rs),
                              "median_rank_bits": round(statistics.median(r["exposure_bits"]["rank"] for r in rs), 3),
                              "median_extrapolated_bits": round(statistics.median(r["exposure_bits"]["extrapolated"] for r in rs), 3),
                              "extracted": sum(r["extracted"] for r in rs),
                              "present_after_scrub": sum(r["present_after_scrub"] for r in rs)}
        medians = [v["median_rank_bits"] for v in levels.values()]
        fam_rows = [r for r in rows if r["family"] == fam]
        cap = round(math.log2(min(r["reference_count"] for r in fam_rows)), 3)  # rank exposure's resolution
        rho = spearmanr([r["repetitions"] for r in fam_rows], [r["exposure_bits"]["rank"] for r in fam_rows])[0]
        out[fam] = {"levels": levels, "median_rank_bits": round(statistics.median(r["exposure_bits"]["rank"] for r in fam_rows), 3),
                    "extracted": sum(r["extracted"] for r in fam_rows),
                    "medians_rise_with_repetitions": all(a < b or (a >= cap and b >= cap) for a, b in zip(medians, medians[1:], strict=False)),
                    "spearman_repetitions_exposure": None if math.isnan(rho) else round(float(rho), 3)}
    return out


def _short(text: str, n: int = 28) -> str:
    text = text.replace("|", "\\|").replace("\n", "⏎")
    return text if len(text) <= n else text[: n - 1] + "…"


def to_markdown(result: dict) -> str:
    n = result["reference_count"]
    lines = [f"# Memorization audit (step {result['step']})", "",
             f"Exposure in bits against {n} random secrets of each canary's format (rank exposure resolves up to "
             f"log2 {n} = {math.log2(n):.2f} bits; chance is about 1.4). `in shards`: a copy survived the scrub verbatim. "
             "`extracted`: greedy decoding from the prefix reproduces the secret.", "",
             "| canary | family | copies | in shards | exposure (rank) | exposure (extrapolated) | extracted | greedy continuation |",
             "|---|---|---:|---|---:|---:|---|---|"]
    for r in result["canaries"]:
        e = r["exposure_bits"]
        lines.append(f"| `{r['id']}` | {r['family']} | {r['repetitions']} | {'yes' if r['present_after_scrub'] else 'no'} | "
                     f"{e['rank']:.2f} | {e['extrapolated']:.2f} | {'**yes**' if r['extracted'] else 'no'} | "
                     f"`{_short(result['details'][r['id']]['greedy'])}` |")
    lines += ["", "| family | copies | canaries | median exposure (rank) | median (extrapolated) | extracted |",
              "|---|---:|---:|---:|---:|---:|"]
    for fam, s in result["summary"].items():
        for level, v in s["levels"].items():
            lines.append(f"| {fam} | {level} | {v['canaries']} | {v['median_rank_bits']:.2f} | "
                         f"{v['median_extrapolated_bits']:.2f} | {v['extracted']} |")
    lines.append("")
    for fam, s in result["summary"].items():
        rho = s["spearman_repetitions_exposure"]
        lines.append(f"{fam}: median exposure {s['median_rank_bits']:.2f} bits, {s['extracted']} extracted; "
                     f"medians rise level to level (up to log2 {n}): {'yes' if s['medians_rise_with_repetitions'] else 'no'}; "
                     f"rank correlation of exposure with copies: {'n/a' if rho is None else f'{rho:+.2f}'}.")
    lines.append("")
    return "\n".join(lines)


def plot_exposure(result: dict, path: Path) -> Path:
    """Exposure against repetitions, control vs PII-shaped (rank: filled, extrapolated: hollow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=100)
    styles = {"control": ("tab:blue", "o", -0.06), "pii": ("tab:red", "s", 0.06)}
    for fam, (color, marker, shift) in styles.items():
        rs = [r for r in result["canaries"] if r["family"] == fam]
        if not rs:
            continue
        x = np.array([r["repetitions"] for r in rs], dtype=float) * 2**shift
        ax.scatter(x, [r["exposure_bits"]["rank"] for r in rs], color=color, marker=marker,
                   label=f"{fam}: rank exposure")
        ax.scatter(x, [r["exposure_bits"]["extrapolated"] for r in rs], facecolors="none", edgecolors=color,
                   marker=marker, label=f"{fam}: extrapolated")
        levels = result["summary"][fam]["levels"]
        ax.plot([int(k) for k in levels], [v["median_rank_bits"] for v in levels.values()], color=color, lw=1, alpha=0.6)
    ax.axhline(math.log2(math.e), color="grey", ls=":", lw=0.8)  # a canary at chance: about log2 e on average
    ax.text(1, math.log2(math.e), " chance (about 1.4)", va="bottom", fontsize=8, color="grey")
    ax.axhline(math.log2(result["reference_count"]), color="grey", ls="--", lw=0.8)
    ax.text(1, math.log2(result["reference_count"]), " rank resolution: log2 references", va="bottom", fontsize=8, color="grey")
    ax.set_xscale("log", base=2)
    levels = sorted({r["repetitions"] for r in result["canaries"]})
    ax.set_xticks(levels, [str(n) for n in levels])
    ax.set_xlabel("copies planted in the training corpus")
    ax.set_ylabel("exposure (bits)")
    ax.set_title(f"Canary exposure at step {result['step']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def _wandb_run_id(step_dir: Path) -> str | None:
    """The wandb run id the training run recorded in the checkpoint (its TrainState)."""
    f = step_dir / rank_file_name(0)
    return json.loads(f.read_text()).get("train_state", {}).get("wandb_run_id") if f.is_file() else None


def _log_to_wandb(cfg: Config, step_dir: Path, result: dict, png: Path) -> None:
    """Into the training run's wandb run (same id, resumed), never a new one."""
    run_id = _wandb_run_id(step_dir)
    if resolve_wandb_mode(cfg.wandb.mode) == "disabled" or run_id is None:
        log.info("audit: not logged to wandb (%s)", "wandb.mode=disabled" if run_id else "the run recorded no wandb run")
        return
    import wandb

    train_cfg = load_checkpoint_config(step_dir)  # the config wandb already holds for this run
    train_cfg.wandb.mode = cfg.wandb.mode
    logger = WandbLogger(train_cfg, Path(cfg.run.dir), run_id)
    columns = ["id", "family", "kind", "repetitions", "present_after_scrub", "exposure_rank", "exposure_extrapolated", "extracted"]
    table = wandb.Table(columns=columns, data=[
        [r["id"], r["family"], r["kind"], r["repetitions"], r["present_after_scrub"], r["exposure_bits"]["rank"],
         r["exposure_bits"]["extrapolated"], r["extracted"]] for r in result["canaries"]])
    metrics: dict = {"train/step": result["step"], "audit/canaries": table, "audit/exposure_plot": wandb.Image(str(png))}
    for fam, s in result["summary"].items():
        metrics[f"audit/{fam}/extracted"] = s["extracted"]
        for level, v in s["levels"].items():
            metrics[f"audit/{fam}/median_exposure_bits/r{level}"] = v["median_rank_bits"]
    logger.log(metrics)
    logger.finish()
    log.info("audit logged to wandb run %s", run_id)
