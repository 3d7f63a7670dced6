"""`python -m data_pipelines bench {pii,scrub}`: scrub throughput in MB/s per worker process.

Fixed corpus: the 106 articles of ``builtin:enwiki-sample`` (about 3 MB of text), written once to
a jsonl file before timing, so markup stripping (a one-off preparation step) is not measured.
Models are loaded, HF datasets' one-off start-up (~1.5 s per process) is paid and the detectors
are warmed up before the clocks start: the figures are steady-state throughput, what a long
scrub sees. MB = 1e6 bytes of UTF-8 document text.

- ``pii``: ``PIIRedactor.redact`` alone over the corpus (``measure_throughput``), in-process.
- ``scrub``: that, plus the full default pipeline (``run_scrub`` with one worker, in-process,
  every filter as configured) from the jsonl file to finished shards, manifest and report.

The last line printed is one JSON object.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

from data_pipelines.evaluation.pii_heldout import make_heldout_set
from data_pipelines.scrub.filters.pii import VERSION as PII_VERSION
from data_pipelines.scrub.filters.pii import PIIRedactor, measure_throughput

log = logging.getLogger(__name__)

PII_BAR_MB_S = 50.0
FULL_BAR_MB_S = 2.0


def _prepare_corpus(path: Path) -> list[str]:
    from data_pipelines.scrub.readers import read_enwiki  # lazy: a command loads its stack when run

    texts = []
    with open(path, "w", encoding="utf-8") as fh:
        for rec in read_enwiki():
            fh.write(json.dumps({"id": rec.id, "text": rec.text, "meta": rec.meta}, ensure_ascii=False) + "\n")
            texts.append(rec.text)
    return texts


def bench_scrub(cfg, pii_only: bool = False) -> int:
    from data_pipelines.scrub.runner import run_scrub  # lazy: a command loads its stack when run

    result: dict = {"corpus": "builtin:enwiki-sample"}
    with tempfile.TemporaryDirectory(prefix="scrub-bench-") as tmp:
        corpus = Path(tmp) / "enwiki.jsonl"
        texts = _prepare_corpus(corpus)
        mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
        result.update(corpus_docs=len(texts), corpus_mb=round(mb, 3))

        redactor = PIIRedactor(cfg.scrub.pii)
        redactor.redact(texts[0])  # warm-up
        result["pii_mb_per_s"] = round(measure_throughput(redactor, texts, repeat=3), 2)
        result["pii_bar_mb_per_s"] = PII_BAR_MB_S
        result.update(pii_engine=redactor.engine, pii_version=PII_VERSION)  # what was measured, for comparisons
        # The same articles with PII sprinkled in: a held-out document after every paragraph
        # break, so validators (phonenumbers above all) run on the hot path.
        extra = [r["text"] for r in make_heldout_set(seed=1)]
        sprinkled = [t.replace("\n\n", f"\n\n{extra[i % len(extra)]}\n\n", 40) for i, t in enumerate(texts)]
        result["pii_sprinkled_mb_per_s"] = round(measure_throughput(redactor, sprinkled, repeat=1), 2)
        spans = sum(len(redactor.detect(t)) for t in sprinkled)
        result["pii_sprinkled_spans_per_mb"] = round(spans / (sum(len(t.encode("utf-8")) for t in sprinkled) / 1e6))

        if not pii_only:
            scrub = dataclasses.replace(cfg.scrub, inputs=[str(corpus)], input_format="auto",
                                        output=str(Path(tmp) / "out"), workers=1, rank=0, world_size=1,
                                        stage="all")
            run_cfg = dataclasses.replace(cfg, scrub=scrub)
            # Warm-up: one scrub of a few documents with the very same config (same input path and
            # output), so models load, patterns compile and HF datasets starts up outside the clock.
            # The filters are cached per process and config, so the timed run reuses them.
            corpus.write_text("".join(json.dumps({"id": f"warm-{i}", "text": t}) + "\n" for i, t in enumerate(texts[:3])))
            run_scrub(run_cfg)
            shutil.rmtree(scrub.output)
            _prepare_corpus(corpus)
            t0 = time.perf_counter()
            run_scrub(run_cfg)
            wall = time.perf_counter() - t0
            report = json.loads((Path(scrub.output) / "report.json").read_text())
            result.update(
                full_mb_per_s=round(mb / wall, 2), full_bar_mb_per_s=FULL_BAR_MB_S, full_wall_s=round(wall, 3),
                kept=report["documents"]["kept"], dropped=report["documents"]["dropped"],
                stage_seconds=report["throughput"]["stage_seconds"],
            )
    result["workers"] = 1
    result["pii_pass"] = result["pii_mb_per_s"] >= PII_BAR_MB_S
    if not pii_only:
        result["full_pass"] = result["full_mb_per_s"] >= FULL_BAR_MB_S
    print(f"PII alone: {result['pii_mb_per_s']} MB/s per worker (bar {PII_BAR_MB_S}); "
          f"with PII sprinkled in: {result['pii_sprinkled_mb_per_s']} MB/s")
    if not pii_only:
        print(f"full pipeline: {result['full_mb_per_s']} MB/s per worker (bar {FULL_BAR_MB_S})")
    print(json.dumps(result))
    return 0
