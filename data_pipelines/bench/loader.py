"""`python -m data_pipelines bench loader`: how fast the training loader feeds one rank.

Measures, on the configured sources and tokenizer (the demo corpus by default) at the configured
`data.seq_len` and `train.micro_batch_size`:

- streaming tokens/s with one DataLoader worker process (what a rank gets with data.num_workers=1)
  and in the training process itself (data.num_workers=0);
- pretokenized tokens/s with one worker (pretokenizing into a temporary directory unless
  `data.pretokenized_dir` already holds an index);
- the cost of a resume: build a loader, load a state saved after 10 and after 10,000 batches, and
  produce the next batch (a loader that spins through consumed data would grow 1000x).

The last line printed is one JSON object: per loader its batches, input tokens, seconds and
tokens/s, and the restore times.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
import time
from pathlib import Path

from data_pipelines.loaders import build_train_loader
from data_pipelines.loading.pretokenize import INDEX_NAME, pretokenize

log = logging.getLogger(__name__)

TRAINER_BENCH_TOKENS_PER_S = 8_600  # the CPU trainer's target at the bench shape; the loader must give 10x


def _throughput(cfg, seconds: float) -> dict:
    """Batches and input tokens the loader gives in about `seconds` (after a warm-up), and their rate."""
    loader = build_train_loader(cfg, 0, 1)
    try:
        for _ in range(5):  # warm-up: worker start, first chunk reads
            next(loader)
        batches, tokens, t0 = 0, 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            tokens += next(loader)["input_ids"].numel()
            batches += 1
        elapsed = time.perf_counter() - t0
        return {"batches": batches, "tokens": tokens, "seconds": elapsed, "tokens_per_s": round(tokens / elapsed)}
    finally:
        loader.close()


def _restore_seconds(cfg, batches: int) -> tuple[float, float]:
    """(build + load_state_dict + first batch, first batch only) after `batches` batches."""
    loader = build_train_loader(cfg, 0, 1)
    for _ in range(batches):
        next(loader)
    state = json.loads(json.dumps(loader.state_dict()))
    expected = next(loader)["input_ids"]
    t0 = time.perf_counter()
    fresh = build_train_loader(cfg, 0, 1)
    fresh.load_state_dict(state)
    t1 = time.perf_counter()
    got = next(fresh)["input_ids"]
    t2 = time.perf_counter()
    if not bool((got == expected).all()):
        raise AssertionError("restored loader did not continue with the next batch")
    return t2 - t0, t2 - t1


def bench_loader(cfg, seconds: float = 5.0, restore_far: int = 10_000) -> int:
    d = cfg.data
    result: dict = {"bench": "loader", "seq_len": d.seq_len, "micro_batch": cfg.train.micro_batch_size,
                    "sources": [s.path for s in d.sources], "tokenizer": d.tokenizer}
    stream_cfg = copy.deepcopy(cfg)
    stream_cfg.data.mode = "streaming"
    stream_cfg.data.num_workers = 1
    result["streaming"] = _throughput(stream_cfg, seconds)
    stream_cfg.data.num_workers = 0
    result["streaming_in_process"] = _throughput(stream_cfg, seconds)
    result["streaming_tokens_per_s"] = result["streaming"]["tokens_per_s"]
    result["streaming_in_process_tokens_per_s"] = result["streaming_in_process"]["tokens_per_s"]
    log.info("streaming: %s tokens/s (1 worker), %s in process", result["streaming_tokens_per_s"],
             result["streaming_in_process_tokens_per_s"])

    t0 = time.perf_counter()
    near = _restore_seconds(stream_cfg, 10)
    far = _restore_seconds(stream_cfg, restore_far)
    result.update(restore_s_at_10=round(near[0], 4), restore_s_at_far=round(far[0], 4), restore_far_batches=restore_far,
                  first_batch_after_restore_s_at_10=round(near[1], 4),
                  first_batch_after_restore_s_at_far=round(far[1], 4))
    log.info("restore (build + load + first batch): %.3fs after 10 batches, %.3fs after %d (%.0fs to get there)",
             near[0], far[0], restore_far, time.perf_counter() - t0)

    with tempfile.TemporaryDirectory(prefix="bench-pretok-") as tmp:
        pre_cfg = copy.deepcopy(cfg)
        if not (Path(d.pretokenized_dir) / INDEX_NAME).is_file():
            pre_cfg.data.pretokenized_dir = tmp
        pretokenize(pre_cfg)
        pre_cfg.data.mode = "pretokenized"
        pre_cfg.data.num_workers = 1
        result["pretokenized"] = _throughput(pre_cfg, seconds)
        result["pretokenized_tokens_per_s"] = result["pretokenized"]["tokens_per_s"]
    log.info("pretokenized: %s tokens/s (1 worker)", result["pretokenized_tokens_per_s"])
    result["trainer_needs_tokens_per_s"] = TRAINER_BENCH_TOKENS_PER_S
    result["streaming_margin_x"] = round(result["streaming_tokens_per_s"] / TRAINER_BENCH_TOKENS_PER_S, 1)
    print(json.dumps(result), flush=True)
    return 0
