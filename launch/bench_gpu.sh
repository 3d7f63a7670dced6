#!/usr/bin/env bash
# `make bench-gpu`: the whole one-GPU check in one run, at most ~9 minutes.
#   1. `make test-gpu` (the CUDA tests)                                      timeout  80 s
#   2. model step vs nanoGPT's whole-model compile, 125M, 16 x 1024 tokens  timeout  75 s
#   3. trainer benches: 125M (gpu_125m), 1B seq 2048 ZeRO-1 (gpu_1b),
#      7B ZeRO-3 + activation checkpointing (gpu_7b)                         timeout 80/95/150 s
#   4. `pretrain plan` of the same three configs at one GPU of this GPU's memory (CPU only):
#      the table puts each predicted peak beside the bench's measured peak   timeout 3 x 90 s
# Each part is bounded with `timeout` and a failure does not stop the others; the table at the
# end (also runs/bench-gpu/BENCH_GPU.md) says which part failed or timed out. Full logs and
# each part's JSON sit in runs/bench-gpu/.
#
# BENCH_GPU_DRY=1 runs the same plumbing on the CPU with tiny shapes (a test checks it);
# BENCH_GPU_DATA="data.sources.0.path=... data.tokenizer=..." replaces the demo corpus (dry runs,
# tests). Without it, a first run prepares the demo corpus and tokenizer (outside the 8 minutes).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${BENCH_GPU_OUT:-runs/bench-gpu}
DRY=${BENCH_GPU_DRY:-0}
mkdir -p "$OUT"
export WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
read -r -a DATA <<< "${BENCH_GPU_DATA:-}"

if [[ -z "${BENCH_GPU_DATA:-}" ]]; then  # the trainer benches read the demo corpus and tokenizer
  [[ -f runs/demo/scrubbed/manifest.json ]] || timeout 300 "$PY" -m data_pipelines scrub configs/demo.yaml
  [[ -f runs/demo/tokenizer/tokenizer.json ]] || timeout 300 "$PY" -m data_pipelines train-tokenizer configs/demo.yaml
fi

if [[ $DRY == 1 ]]; then  # tiny shapes on the CPU: checks the plumbing, not the speed
  T_TEST=300 T_MODEL=300 T_125M=300 T_1B=300 T_7B=300 T_PLAN=300  # generous: shared CI machines are slow
  MODEL=(--device cpu --config configs/model/tiny.yaml --batch 1 --seq 32 --warmup 1 --steps 2
         --variants nanogpt_autocast,bf16_master)
  TINY=(model.n_layers=2 model.d_model=64 model.n_heads=4 model.n_kv_heads=2 model.ffn_hidden=null model.vocab_size=1024
        model.max_seq_len=32 data.seq_len=32 data.num_workers=0 train.micro_batch_size=1 model.compile=false
        bench.warmup_steps=1 bench.steps=2 deepspeed.offload_optimizer=false)
  TESTS=(--collect-only -q)
  GPU_GIB=80  # the plan is of a GPU either way; in a dry run its peak is not comparable with the CPU's RSS
else
  T_TEST=80 T_MODEL=75 T_125M=80 T_1B=95 T_7B=150 T_PLAN=90  # 750 s at most, ~540 s in practice
  MODEL=(--device cuda --config configs/model/125m.yaml --batch 16 --seq 1024 --warmup 3 --steps 10
         --variants nanogpt_compile,bf16_master_compile model.vocab_size=4096 model.max_seq_len=1024)
  TINY=()
  TESTS=(-q)
  GPU_GIB=$("$PY" -c 'import torch; print(torch.cuda.get_device_properties(0).total_memory / 2**30)')
fi

declare -A STATUS
part() {  # part NAME SECONDS CMD...: run under timeout, keep the log, the last JSON line -> NAME.json
  local name=$1 secs=$2; shift 2
  echo "== $name (timeout ${secs}s): $*" >&2
  timeout --kill-after=10 "$secs" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep '^{"' "$OUT/$name.log" | tail -n 1 > "$OUT/$name.json"
  case $rc in
    0) STATUS[$name]=ok ;;
    124|137) STATUS[$name]="timed out after ${secs}s" ;;
    *) STATUS[$name]="failed (exit $rc)" ;;
  esac
  echo "   $name: ${STATUS[$name]}" >&2
}

part test_gpu "$T_TEST" "$PY" -m pytest -m gpu tests/pretrain/test_gpu.py "${TESTS[@]}"
part model_vs_nanogpt "$T_MODEL" "$PY" -m pretrain.bench.model "${MODEL[@]}"
part trainer_125m "$T_125M" "$PY" -m pretrain bench configs/bench/gpu_125m.yaml "${DATA[@]}" "${TINY[@]}"
part trainer_1b "$T_1B" "$PY" -m pretrain bench configs/bench/gpu_1b.yaml "${DATA[@]}" "${TINY[@]}"
part trainer_7b "$T_7B" "$PY" -m pretrain bench configs/bench/gpu_7b.yaml "${DATA[@]}" "${TINY[@]}"
for size in 125m 1b 7b; do
  part "plan_$size" "$T_PLAN" "$PY" -m pretrain plan "configs/bench/gpu_$size.yaml" "${DATA[@]}" "${TINY[@]}" \
    --gpus 1 --gpu-memory-gib "$GPU_GIB"
done

for name in "${!STATUS[@]}"; do echo "$name=${STATUS[$name]}"; done > "$OUT/status.txt"
"$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
status = dict(line.rstrip("\n").split("=", 1) for line in (out / "status.txt").read_text().splitlines())

def load(name):
    text = (out / f"{name}.json").read_text().strip()
    return json.loads(text) if text else {}

def fmt(v, spec):
    return "-" if v is None else format(v, spec)

rows = ["| part | tokens/s | MFU | peak memory GiB | planned peak GiB | plan error | loader wait | step s | status |",
        "|---|---|---|---|---|---|---|---|---|"]
m = load("model_vs_nanogpt")
for variant, tps in m.get("tokens_per_s", {}).items():
    rows.append(f"| model step {variant} | {fmt(tps, ',.0f')} | {fmt(m['mfu'].get(variant), '.3f')} | - | - | - | - | - |"
                f" {status['model_vs_nanogpt']} |")
if not m:
    rows.append(f"| model step vs nanoGPT | - | - | - | - | - | - | - | {status['model_vs_nanogpt']} |")
for size in ("125m", "1b", "7b"):
    name, r, plan = f"trainer_{size}", load(f"trainer_{size}"), load(f"plan_{size}")
    mem = r.get("memory_bytes")
    planned = plan["plans"][0]["total_bytes"] if plan.get("plans") else None
    error = (planned - mem) / mem if planned and mem else None
    plan_status = "" if status[f"plan_{size}"] == "ok" else f" (plan {status[f'plan_{size}']})"
    rows.append(f"| {name} | {fmt(r.get('tokens_per_s'), ',.0f')} | {fmt(r.get('mfu'), '.3f')} |"
                f" {fmt(mem / 2**30 if mem else None, '.1f')} | {fmt(planned / 2**30 if planned else None, '.1f')} |"
                f" {fmt(error, '+.1%')} | {fmt(r.get('loader_wait_frac'), '.4f')} |"
                f" {fmt(r.get('step_time_s_median'), '.3f')} | {status[name]}{plan_status} |")
base = m.get("tokens_per_s", {}).get(m.get("nanogpt_baseline"))
t125 = load("trainer_125m").get("tokens_per_s")
verdict = f"trainer 125M / nanoGPT {m.get('nanogpt_baseline')}: {t125 / base:.2f}x (bar 1.0x)" if base and t125 else ""
on_gpu = any(load(f"trainer_{size}").get("device", "").startswith("cuda") for size in ("125m", "1b", "7b"))
plan_note = ("plan error = (planned - measured) / measured peak (bar: within 15%)" if on_gpu
             else "plan error: a dry run's peak memory is the CPU process RSS, not comparable with a GPU plan")
table = "\n".join([f"test-gpu: {status['test_gpu']}", "", *rows, "", verdict, plan_note])
(out / "BENCH_GPU.md").write_text(table + "\n")
print(table)
PYEOF
grep -qv "=ok$" "$OUT/status.txt" && exit 1 || exit 0
