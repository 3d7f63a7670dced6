#!/usr/bin/env bash
# `make bench`: the scrub, loader and trainer benchmarks on this machine, one markdown table.
# Each bench prints one JSON object as its last line; the table is written to runs/bench/BENCH.md
# (docs/benchmarks.md quotes it). Needs the demo corpus and tokenizer: run `make demo` once first, or it
# prepares them itself.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=runs/bench
mkdir -p "$OUT"
export WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false

# The loader and trainer benches read the scrubbed demo corpus and its tokenizer.
if [[ ! -f runs/demo/scrubbed/manifest.json ]]; then "$PY" -m data_pipelines scrub configs/demo.yaml; fi
if [[ ! -f runs/demo/tokenizer/tokenizer.json ]]; then "$PY" -m data_pipelines train-tokenizer configs/demo.yaml; fi

run() {  # run NAME CMD...: keep the full log, return the last JSON line
  local name=$1; shift
  echo "== $name: $*" >&2
  "$@" > "$OUT/$name.log" 2>&1 || { echo "bench $name failed, see $OUT/$name.log" >&2; tail -20 "$OUT/$name.log" >&2; exit 1; }
  grep '^{' "$OUT/$name.log" | tail -n 1 > "$OUT/$name.json"
  cat "$OUT/$name.json" >&2
}
run scrub   "$PY" -m data_pipelines bench scrub
run loader  "$PY" -m data_pipelines bench loader --config configs/bench/cpu_small.yaml
run trainer "$PY" -m pretrain bench configs/bench/cpu_small.yaml
run overhead "$PY" -m pretrain.bench.overhead configs/bench/cpu_overhead.yaml

"$PY" - "$OUT" <<'PYEOF'
import json, platform, sys, os
from pathlib import Path
out = Path(sys.argv[1])
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
import torch
rows = []
for name in ("scrub", "loader", "trainer", "overhead"):
    data = json.loads((out / f"{name}.json").read_text())
    for k, v in data.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            rows.append(f"| {name} | `{k}` | {v:.4g} |")
md = [
    "# Benchmarks",
    "",
    f"Machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}.",
    "Reproduce with `make bench`; full logs and JSON in runs/bench/.",
    "",
    "| bench | metric | value |",
    "|---|---|---|",
    *rows,
    "",
]
(out / "BENCH.md").write_text("\n".join(md))
print("\n".join(md))
PYEOF
