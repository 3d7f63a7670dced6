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
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

PII_BAR_MB_S = 10.0
FULL_BAR_MB_S = 2.0


def _prepare_corpus(path: Path) -> list[str]:
    from data_pipelines.readers import read_enwiki

    texts = []
    with open(path, "w", encoding="utf-8") as fh:
        for rec in read_enwiki():
            fh.write(json.dumps({"id": rec.id, "text": rec.text, "meta": rec.meta}, ensure_ascii=False) + "\n")
            texts.append(rec.text)
    return texts


def bench_scrub(cfg, pii_only: bool = False) -> int:
    from data_pipelines.filters.pii import PIIRedactor, measure_throughput
    from data_pipelines.readers import raw_lines
    from data_pipelines.scrub import filters_for, run_scrub

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

        if not pii_only:
            scrub = dataclasses.replace(cfg.scrub, inputs=[str(corpus)], input_format="auto",
                                        output=str(Path(tmp) / "out"), workers=1, rank=0, world_size=1,
                                        stage="all")
            run_cfg = dataclasses.replace(cfg, scrub=scrub)
            f = filters_for(run_cfg)  # load models and compile patterns outside the timed region
            warm = Path(tmp) / "warm.jsonl"
            warm.write_text('{"text": "warm-up"}\n')
            list(raw_lines(str(warm)))  # HF datasets' first load_dataset in a process costs ~1.5 s
            if f.language:
                f.language.keep(texts[0])
            if f.toxicity:
                f.toxicity.score(texts[0][:2000])
            f.redact(texts[0][:2000])
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
    print(f"PII alone: {result['pii_mb_per_s']} MB/s per worker (bar {PII_BAR_MB_S})")
    if not pii_only:
        print(f"full pipeline: {result['full_mb_per_s']} MB/s per worker (bar {FULL_BAR_MB_S})")
    print(json.dumps(result))
    return 0
