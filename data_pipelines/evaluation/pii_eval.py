"""PII evaluation: per-type precision, recall and F1 of a detector on labelled records.

Records are ``{"text": ..., "spans": [{"start", "end", "type"}]}`` (optionally ``"negatives"``
with a ``"kind"``, as written by :mod:`data_pipelines.evaluation.pii_synth`, and a ``"class"``,
as written by :mod:`data_pipelines.evaluation.pii_heldout`). A predicted span is correct when it
overlaps a labelled span of the same type; a labelled span is found when a predicted span of its
type overlaps it. False positives that land on a planted hard negative are also counted per
negative kind, which says *what* the detector confused for PII; a planted negative *survives*
when no predicted span of any type touches it. Records with a ``"class"`` are also scored per
class (all types of the class's records together).

``eval-pii builtin:pii-heldout[:SEED]`` scores the held-out set without writing it to a file.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data_pipelines.evaluation.pii_heldout import make_heldout_set
from data_pipelines.scrub.filters.pii import PIIRedactor
from pretrain.errors import UserError

if TYPE_CHECKING:
    from pretrain.config import Config

log = logging.getLogger(__name__)


def _overlaps(a0: int, a1: int, b0: int, b1: int) -> bool:
    return a0 < b1 and b0 < a1


def evaluate(records: Iterable[dict], detector: Any) -> dict:
    """Score ``detector`` (an object with ``detect(text)`` or a callable text -> spans).

    Returns ``{"per_type": {type: {"tp", "fp", "fn", "precision", "recall", "f1", "support"}},
    "micro": {...}, "fp_by_negative_kind": {...}, "examples": {"fp": [...], "fn": [...]}}``.
    """
    detect: Callable[[str], list] = detector.detect if hasattr(detector, "detect") else detector
    tp_pred: Counter[str] = Counter()
    n_pred: Counter[str] = Counter()
    found: Counter[str] = Counter()
    n_gold: Counter[str] = Counter()
    fp_kinds: Counter[str] = Counter()
    planted: Counter[str] = Counter()
    survived: Counter[str] = Counter()
    by_class: dict[str, Counter[str]] = defaultdict(Counter)
    examples: dict[str, list] = defaultdict(list)
    for rec in records:
        text, gold = rec["text"], rec.get("spans", [])
        pred = detect(text)
        for neg in rec.get("negatives", ()):
            planted[neg["kind"]] += 1
            if not any(_overlaps(p.start, p.end, neg["start"], neg["end"]) for p in pred):
                survived[neg["kind"]] += 1
        by_type: dict[str, list] = defaultdict(list)
        for p in pred:
            by_type[p.type].append(p)
        cls = by_class[rec["class"]] if "class" in rec else Counter()
        for g in gold:
            n_gold[g["type"]] += 1
            cls["gold"] += 1
            if any(_overlaps(p.start, p.end, g["start"], g["end"]) for p in by_type.get(g["type"], ())):
                found[g["type"]] += 1
                cls["found"] += 1
            elif len(examples["fn"]) < 50:
                examples["fn"].append({"type": g["type"], "value": text[g["start"]:g["end"]],
                                       "context": text[max(0, g["start"] - 30):g["end"] + 30]})
        for p in pred:
            n_pred[p.type] += 1
            cls["pred"] += 1
            if any(g["type"] == p.type and _overlaps(p.start, p.end, g["start"], g["end"]) for g in gold):
                tp_pred[p.type] += 1
                cls["tp"] += 1
                continue
            kind = next((n["kind"] for n in rec.get("negatives", ()) if _overlaps(p.start, p.end, n["start"], n["end"])), "unlabelled")
            fp_kinds[f"{p.type}<-{kind}"] += 1
            if len(examples["fp"]) < 50:
                examples["fp"].append({"type": p.type, "value": text[p.start:p.end], "negative_kind": kind,
                                       "context": text[max(0, p.start - 30):p.end + 30]})

    def scores(tp: int, npred: int, fnd: int, ngold: int) -> dict:
        precision = tp / npred if npred else 1.0
        recall = fnd / ngold if ngold else 1.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
                "tp": tp, "fp": npred - tp, "fn": ngold - fnd, "support": ngold, "predicted": npred}

    types = sorted(set(n_gold) | set(n_pred))
    per_type = {t: scores(tp_pred[t], n_pred[t], found[t], n_gold[t]) for t in types}
    micro = scores(sum(tp_pred.values()), sum(n_pred.values()), sum(found.values()), sum(n_gold.values()))
    per_class = {c: scores(k["tp"], k["pred"], k["found"], k["gold"]) for c, k in sorted(by_class.items())}
    n_planted, n_survived = sum(planted.values()), sum(survived.values())
    negatives = {"planted": n_planted, "survived": n_survived,
                 "survival": round(n_survived / n_planted, 4) if n_planted else 1.0,
                 "by_kind": {k: {"planted": planted[k], "survived": survived[k]} for k in sorted(planted)}}
    return {"per_type": per_type, "micro": micro, "per_class": per_class, "negatives": negatives,
            "fp_by_negative_kind": dict(fp_kinds), "examples": dict(examples)}


HELDOUT = "builtin:pii-heldout"


def read_labelled(path: str | Path) -> list[dict]:
    """Read and check labelled jsonl; a malformed line is a UserError naming the file and line.
    ``builtin:pii-heldout[:SEED]`` is the held-out set, built in memory."""
    if str(path) == HELDOUT or str(path).startswith(HELDOUT + ":"):
        seed = str(path)[len(HELDOUT) + 1:]
        if seed and not seed.isdigit():
            raise UserError(f"{path}: the seed after {HELDOUT}: must be a non-negative integer")
        return make_heldout_set(seed=int(seed)) if seed else make_heldout_set()
    p = Path(path)
    if not p.is_file():
        raise UserError(f"labelled PII file not found: {p}")
    records = []
    with p.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{p}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise UserError(f"{p}:{lineno}: expected an object with a string field 'text'")
            spans = rec.get("spans", [])
            if not isinstance(spans, list) or not all(
                isinstance(s, dict) and isinstance(s.get("start"), int) and isinstance(s.get("end"), int)
                and isinstance(s.get("type"), str) and 0 <= s["start"] < s["end"] <= len(rec["text"]) for s in spans
            ):
                raise UserError(f"{p}:{lineno}: 'spans' must be a list of {{start, end, type}} within the text")
            records.append(rec)
    return records


def format_table(result: dict) -> str:
    header = f"{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}{'tp':>7}{'fp':>7}{'fn':>7}"
    rows = [f"{'type':<16}{header}"]

    def row(name: str, s: dict) -> str:
        return f"{name:<16}{s['precision']:>10.4f}{s['recall']:>10.4f}{s['f1']:>10.4f}{s['support']:>9}{s['tp']:>7}{s['fp']:>7}{s['fn']:>7}"

    rows += [row(name, s) for name, s in [*result["per_type"].items(), ("micro", result["micro"])]]
    if result.get("per_class"):
        rows += ["", f"{'class':<16}{header}"] + [row(name, s) for name, s in result["per_class"].items()]
    neg = result.get("negatives")
    if neg and neg["planted"]:
        rows += ["", f"hard negatives surviving: {neg['survived']}/{neg['planted']} = {neg['survival']:.4f}"]
    return "\n".join(rows)


def eval_pii_cli(path: str, cfg: Config) -> int:
    """`python -m data_pipelines eval-pii LABELLED.jsonl`: table, then one JSON line."""
    records = read_labelled(path)
    redactor = PIIRedactor(cfg.scrub.pii)
    result = evaluate(records, redactor)
    print(format_table(result))
    if result["fp_by_negative_kind"]:
        print("false positives by planted negative: " + ", ".join(f"{k}={v}" for k, v in sorted(result["fp_by_negative_kind"].items())))
    summary = {"records": len(records), "engine": redactor.engine, "per_type": result["per_type"], "micro": result["micro"],
               "per_class": result["per_class"], "negatives": result["negatives"],
               "fp_by_negative_kind": result["fp_by_negative_kind"]}
    print(json.dumps(summary, sort_keys=True))
    return 0
