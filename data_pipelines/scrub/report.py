"""report.json (everything, machine-readable) and report.md (the same for people) of a scrub."""

from __future__ import annotations

import json
from pathlib import Path

from data_pipelines.scrub.filters.bias import disparity_rows
from pretrain.fileio import write_text_atomic

FILTER_ORDER = ("malformed", "language", "quality", "dedup", "toxicity")


def build_report(cfg, manifest: dict, totals: dict, p1: list[dict], p3: list[dict], wall_s: float,
                 audit_rel: str | None, canaries: dict | None = None) -> dict:
    s = cfg.scrub
    docs = manifest["documents"]
    nbytes = totals.get("bytes", 0)
    worker_s = sum(st.get("seconds", 0.0) for st in p1 + p3)
    by_filter: dict[str, int] = {}
    for reason, n in manifest["dropped_by_reason"].items():
        by_filter[reason.split(".")[0]] = by_filter.get(reason.split(".")[0], 0) + n
    bias = totals.get("bias", {})
    rows = disparity_rows(bias, s.bias.disparity_threshold, s.bias.min_docs) if s.bias.enabled and bias else []
    return {
        "documents": docs,
        "accounting": {"identity": "kept + dropped = read", "holds": docs["kept"] + docs["dropped"] == docs["read"]},
        "filter_order": ["malformed", "normalize", "language", "quality", "dedup", "toxicity", "pii"],
        "dropped_by_filter": {f: by_filter.get(f, 0) for f in FILTER_ORDER},
        "dropped_by_reason": manifest["dropped_by_reason"],
        "pii": manifest["pii"]["counts"],
        "pii_replacement": manifest["pii"]["replacement"],
        "languages_detected": dict(sorted(totals.get("languages", {}).items(), key=lambda kv: -kv[1])),
        "toxicity_masked_docs": totals.get("toxicity_masked", 0),
        "counterfactual_swapped": totals.get("counterfactual_swapped", 0),
        "bias": {
            "disparity_threshold": s.bias.disparity_threshold, "min_docs": s.bias.min_docs,
            "kept_by_group": bias.get("kept_by_group", {}), "dropped_by_group": bias.get("dropped_by_group", {}),
            "rows": rows, "flagged": [r for r in rows if r["flagged"]],
        },
        "throughput": {
            "input_bytes": nbytes,
            "wall_s": round(wall_s, 3),
            "worker_s": round(worker_s, 3),
            "mb_per_s_per_worker": round(nbytes / 1e6 / worker_s, 3) if worker_s > 0 else None,
            "mb_per_s_wall": round(nbytes / 1e6 / wall_s, 3) if wall_s > 0 else None,
            "workers": s.workers, "world_size": s.world_size,
            "stage_seconds": {k: round(v, 3) for k, v in sorted(totals.get("stage_seconds", {}).items(),
                                                                  key=lambda kv: -kv[1])},
            "note": "worker_s sums every unit's phase-1 and phase-3 time (also from earlier resumed runs); wall_s is this invocation only",
        },
        "shards": len(manifest["shards"]),
        "canaries": canaries,
        "audit_sample": audit_rel,
        "config_hash": manifest["config_hash"],
        "filters": manifest["filters"],
        "units": [{"unit": a["unit"], "read": a["read"], "candidates": a["candidates"], "kept": b["kept"]}
                  for a, b in zip(p1, p3, strict=True)],
    }


def _pct(n: int, d: int) -> str:
    return f"{100 * n / d:.1f}%" if d else "-"


def _fmt(x: float | None, nd: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def to_markdown(r: dict) -> str:
    d = r["documents"]
    ok = "holds" if r["accounting"]["holds"] else "BROKEN"
    lines = [
        "# Scrub report", "",
        f"Documents read **{d['read']}**, kept **{d['kept']}**, dropped **{d['dropped']}**.",
        f"Accounting: kept ({d['kept']}) + dropped ({d['dropped']}) = read ({d['read']}): **{ok}**; "
        "every document is dropped for exactly one reason, the first filter that rejected it.", "",
        "Filter order: " + " → ".join(r["filter_order"]) + ".", "",
        "## Dropped per filter and reason", "",
        "| reason | documents | share of read |", "|---|---:|---:|",
    ]
    for reason, n in r["dropped_by_reason"].items():
        lines.append(f"| `{reason}` | {n} | {_pct(n, d['read'])} |")
    if not r["dropped_by_reason"]:
        lines.append("| (none) | 0 | - |")
    lines += ["", "## PII redacted (kept documents)", "", f"Replacement: {r['pii_replacement']}.", "",
              "| type | found |", "|---|---:|"]
    for t, n in r["pii"].items():
        lines.append(f"| {t} | {n} |")
    if not r["pii"]:
        lines.append("| (none) | 0 |")
    b = r["bias"]
    lines += ["", "## Bias audit", "",
              "Removal rate of documents mentioning a group, divided by the filter's overall removal rate. "
              f"Flagged (⚑) when the disparity is at least {b['disparity_threshold']}× and at least "
              f"{b['min_docs']} documents mentioning the group reached the filter.", "",
              "| filter | group | reached | removed | group rate | overall rate | disparity | flag |",
              "|---|---|---:|---:|---:|---:|---:|---|"]
    for row in b["rows"]:
        if row["entered"] == 0:
            continue
        flag = "⚑" if row["flagged"] else ("" if row["enough_docs"] else "few docs")
        lines.append(f"| {row['filter']} | {row['group']} | {row['entered']} | {row['removed']} | "
                     f"{_fmt(row['rate'])} | {_fmt(row['overall_rate'])} | {_fmt(row['disparity'], 2)} | {flag} |")
    flagged = ", ".join(f"{x['group']} at {x['filter']} ({x['disparity']:.1f}×)" for x in b["flagged"]) or "none"
    lines += ["", f"Flagged groups: {flagged}.", "",
              "| group | kept | dropped |", "|---|---:|---:|"]
    for g, n in b["kept_by_group"].items():
        lines.append(f"| {g} | {n} | {b['dropped_by_group'].get(g, 0)} |")
    if r["counterfactual_swapped"]:
        lines.append(f"\nCounterfactual gender swap applied to {r['counterfactual_swapped']} kept documents.")
    if r["toxicity_masked_docs"]:
        lines.append(f"\nToxic spans masked in {r['toxicity_masked_docs']} kept documents.")
    if r.get("canaries"):
        lines += canary_markdown(r["canaries"])
    t = r["throughput"]
    lines += ["", "## Throughput", "",
              f"{t['input_bytes'] / 1e6:.2f} MB of input; {_fmt(t['mb_per_s_per_worker'], 2)} MB/s per worker "
              f"({t['worker_s']:.1f} worker-seconds); {_fmt(t['mb_per_s_wall'], 2)} MB/s wall with "
              f"{t['workers']} worker(s) ({t['wall_s']:.1f} s this invocation).", "",
              "Where the worker time went: " + (", ".join(f"{k} {v:.2f} s" for k, v in t["stage_seconds"].items()) or "-")
              + ".", "",
              f"Shards: {r['shards']}. Config hash `{r['config_hash'][:16]}`. "
              + (f"Audit sample of dropped documents (PII redacted): `{r['audit_sample']}`." if r["audit_sample"] else ""),
              ""]
    return "\n".join(lines)


def _outcome(name: str) -> str:
    """'dropped.quality.c4_too_few_sentences' -> 'dropped (quality.c4_too_few_sentences)'."""
    head, _, rest = name.partition(".")
    return f"{head} ({rest})" if rest else head


def canary_markdown(c: dict) -> list[str]:
    """The report's canary section: where every planted copy ended up, per family."""
    fams = c["families"]
    outcomes = sorted({k for f in fams.values() for k in f["copies"] if k != "planted"},
                      key=lambda k: (k != "kept", k))
    lines = ["", "## Canaries (memorization audit)", "",
             "Copies of planted secrets, each in a different host document, and what the scrub did to each: "
             "kept verbatim in the shards, redacted (PII), altered by another filter, or dropped with its host "
             "(the filter named). Control canaries should all be kept; PII-shaped ones all redacted. "
             f"Registry (secrets and hosts, outside this directory): `{c['registry']}`.", "",
             "| family | canaries | present after scrub | copies planted | " + " | ".join(_outcome(k) for k in outcomes) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(outcomes)]
    for name, f in fams.items():
        cells = " | ".join(str(f["copies"].get(k, 0)) for k in outcomes)
        lines.append(f"| {name} | {f['canaries']} | {f['present_after_scrub']} | {f['copies']['planted']} | {cells} |")
    return lines


def write_report(out: Path, report: dict) -> None:
    write_text_atomic(out / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    write_text_atomic(out / "report.md", to_markdown(report))


def summary_text(r: dict) -> str:
    d = r["documents"]
    reasons = ", ".join(f"{k} {v}" for k, v in r["dropped_by_reason"].items()) or "none"
    pii = ", ".join(f"{k} {v}" for k, v in r["pii"].items()) or "none"
    flagged = ", ".join(f"{x['group']}@{x['filter']}" for x in r["bias"]["flagged"]) or "none"
    return (f"scrub: read {d['read']}, kept {d['kept']}, dropped {d['dropped']} "
            f"(kept + dropped = read: {'yes' if r['accounting']['holds'] else 'NO'})\n"
            f"  dropped: {reasons}\n  PII redacted: {pii}\n  bias flags: {flagged}\n"
            f"  throughput: {_fmt(r['throughput']['mb_per_s_per_worker'], 2)} MB/s per worker"
            + ("".join(f"\n  canaries {name}: {f['copies']['planted']} copies planted, "
                       + ", ".join(f"{_outcome(k)} {n}" for k, n in f["copies"].items() if k != "planted")
                       for name, f in r["canaries"]["families"].items()) if r.get("canaries") else ""))
