#!/usr/bin/env bash
# `make demo`: the main job end to end on the embedded corpus (gensim's Wikipedia sample):
# scrub (with planted canaries) -> tokenizer -> train (2 processes, ZeRO-2, CPU) -> validation
# perplexity -> export -> sample -> memorization audit. Rerunning skips finished stages and resumes
# training from the last checkpoint.
#
#   launch/demo.sh [key=value ...]      overrides go to every stage (e.g. train.max_time_s=120)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
CFG=${DEMO_CONFIG:-configs/demo.yaml}
export WANDB_MODE=${WANDB_MODE:-offline} WANDB_SILENT=true TOKENIZERS_PARALLELISM=false

# The stage directories, from the resolved config (exit 2 with a message on a bad override).
paths=$("$PY" -c '
import sys
from pretrain.config import load_config
from pretrain.errors import ConfigError
try:
    c = load_config(sys.argv[1], sys.argv[2:])
except ConfigError as e:
    sys.exit(f"{e}")
print(c.run.dir, c.scrub.output, c.data.tokenizer)' "$CFG" "$@") || exit 2
read -r RUN_DIR SCRUBBED TOKENIZER <<<"$paths"
nproc=$(nproc)
NPROC=$(( nproc >= 2 ? 2 : 1 ))
stage() { printf '\n\033[1m== %s ==\033[0m\n' "$*"; }
start=$(date +%s)

stage "1/6 scrub the embedded corpus -> $SCRUBBED"
"$PY" -m data_pipelines scrub "$CFG" "$@"   # finished shards are skipped on rerun
sed -n '1,40p' "$SCRUBBED/report.md"

stage "2/6 tokenizer -> $TOKENIZER"
if [[ -f $TOKENIZER ]]; then echo "exists, skipped"; else "$PY" -m data_pipelines train-tokenizer "$CFG" "$@"; fi

stage "3/6 train: $NPROC process(es), ZeRO-2, wandb offline (resumes if a checkpoint exists)"
NPROC_PER_NODE=$NPROC PYTHON="$PY" MASTER_PORT=${MASTER_PORT:-29517} launch/torchrun.sh "$CFG" "$@"
"$PY" - "$RUN_DIR/metrics.jsonl" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
train = [r for r in rows if r.get("kind") == "train"]
val = [r for r in rows if r.get("kind") == "eval"]
if train:
    print(f"train loss: {train[0]['train/loss']:.3f} (step {train[0]['step']}) -> {train[-1]['train/loss']:.3f} (step {train[-1]['step']})")
if val:
    print(f"validation perplexity at step {val[-1]['step']}: {val[-1]['val/ppl']:.2f} (loss {val[-1]['val/loss']:.3f})")
PYEOF

stage "4/6 export to Hugging Face Llama format -> $RUN_DIR/export"
"$PY" -m pretrain export --checkpoint "$RUN_DIR" --out "$RUN_DIR/export"

stage "5/6 sample"
"$PY" -m pretrain generate --checkpoint "$RUN_DIR/export" --prompt "The history of" --max-new-tokens 60 --seed 0

stage "6/6 memorization audit: does the model reproduce the planted canaries? -> $RUN_DIR/audit"
"$PY" -m pretrain audit "$CFG" "$@"   # prints the table; memorization.json and exposure.png beside it

echo
echo "demo finished in $(( $(date +%s) - start )) s. Outputs: $RUN_DIR (config.yaml, metrics.jsonl, loss_curve.png, checkpoints/, export/, audit/, wandb/)"
