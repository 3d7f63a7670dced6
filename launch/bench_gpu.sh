#!/usr/bin/env bash
# `make bench-gpu`: the whole one-GPU check in one run, at most 8 minutes (BENCH_GPU_BUDGET_S).
#   1. `make test-gpu` (the CUDA tests; 83 s on an H200)                     cap 150 s
#   2. model step vs nanoGPT's whole-model compile, 125M, 16 x 1024 tokens  cap  90 s
#   3. trainer benches: 125M without document masking (nanoGPT has none: the bar's row), 125M
#      with it (gpu_125m), 1B seq 2048 (gpu_1b), 7B ZeRO-3 + activation checkpointing (gpu_7b)
#                                                                            caps 75/90/120/180 s
#   4. `pretrain plan` of the 125M, 1B and 7B configs at one GPU of this GPU's memory (CPU only,
#      in the background at low priority while 1-3 run): the table puts each predicted peak
#      beside the bench's measured peak                                      cap 90 s each
# All parts share one budget (one clock, part 4 included): each runs under `timeout` for its cap
# or what is left of the budget, whichever is smaller, and a part that would get less than 20 s
# is not started. So no part can be killed by an earlier one's overrun of a fixed slot, and the
# whole never exceeds the budget. A failure does not stop the others;
# the table at the end (also runs/bench-gpu/BENCH_GPU.md) says which part failed, timed out or
# did not run, and how long each took. Full logs and each part's JSON sit in runs/bench-gpu/.
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
  T_TEST=300 T_MODEL=300 T_125M=300 T_125M_NOMASK=300 T_1B=300 T_7B=300 T_PLAN=300  # generous: shared CI machines are slow
  BUDGET=${BENCH_GPU_BUDGET_S:-3600}
  MODEL=(--device cpu --config configs/model/tiny.yaml --batch 1 --seq 32 --warmup 1 --steps 2
         --variants nanogpt_autocast,bf16_master)
  TINY=(model.n_layers=2 model.d_model=64 model.n_heads=4 model.n_kv_heads=2 model.ffn_hidden=null model.vocab_size=1024
        model.max_seq_len=32 data.seq_len=32 data.num_workers=0 train.micro_batch_size=1 model.compile=false
        bench.warmup_steps=1 bench.steps=2 deepspeed.offload_optimizer=false)
  TESTS=(--collect-only -q)
  GPU_GIB=80  # the plan is of a GPU either way; in a dry run its peak is not comparable with the CPU's RSS
else
  T_TEST=150 T_MODEL=90 T_125M=90 T_125M_NOMASK=75 T_1B=120 T_7B=180 T_PLAN=90  # caps; the budget bounds the sum
  BUDGET=${BENCH_GPU_BUDGET_S:-480}
  MODEL=(--device cuda --config configs/model/125m.yaml --batch 16 --seq 1024 --warmup 3 --steps 10
         --variants nanogpt_compile,bf16_master_compile model.vocab_size=4096 model.max_seq_len=1024)
  TINY=()
  TESTS=(-q)
  GPU_GIB=$("$PY" -c 'import torch; print(torch.cuda.get_device_properties(0).total_memory / 2**30)')
fi

KILL_AFTER=10  # seconds between timeout's TERM and KILL: counted against the budget too
MIN_PART_S=20
START=$SECONDS
declare -A STATUS SECS
run_part() {  # run_part NAME SECONDS CMD...: run under timeout, keep the log, the last JSON line -> NAME.json
  local name=$1 secs=$2; shift 2
  echo "== $name (timeout ${secs}s): $*" >&2
  local t0=$SECONDS
  timeout --kill-after=$KILL_AFTER "$secs" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  SECS[$name]=$(( SECONDS - t0 ))
  grep '^{"' "$OUT/$name.log" | tail -n 1 > "$OUT/$name.json"
  case $rc in
    0) STATUS[$name]=ok ;;
    124|137) STATUS[$name]="timed out after ${secs}s" ;;
    *) STATUS[$name]="failed (exit $rc)" ;;
  esac
  echo "   $name: ${STATUS[$name]} in ${SECS[$name]}s" >&2
}
part() {  # part NAME CAP CMD...: run_part for CAP seconds or what is left of the budget
  local name=$1 cap=$2; shift 2
  local left=$(( BUDGET - (SECONDS - START) - KILL_AFTER ))
  local secs=$(( cap < left ? cap : left ))
  : > "$OUT/$name.log"; : > "$OUT/$name.json"
  if (( secs < MIN_PART_S )); then
    STATUS[$name]="not run: ${left}s left of the ${BUDGET}s budget"; SECS[$name]=0
    echo "== $name: ${STATUS[$name]}" >&2
    return
  fi
  run_part "$name" "$secs" "$@"
}

(  # part 4, CPU only: in the background, at low priority, its statuses in a file of its own
  for size in 125m 1b 7b; do
    part "plan_$size" "$T_PLAN" nice -n 10 "$PY" -m pretrain plan "configs/bench/gpu_$size.yaml" "${DATA[@]}" \
      "${TINY[@]}" --gpus 1 --gpu-memory-gib "$GPU_GIB"
  done
  for name in "${!STATUS[@]}"; do echo "$name=${STATUS[$name]}"; done > "$OUT/status.plan.txt"
  for name in "${!SECS[@]}"; do echo "$name=${SECS[$name]}"; done > "$OUT/seconds.plan.txt"
) &
PLANS=$!

part test_gpu "$T_TEST" "$PY" -m pytest -m gpu tests/pretrain/test_gpu.py "${TESTS[@]}"
part model_vs_nanogpt "$T_MODEL" "$PY" -m pretrain.bench.model "${MODEL[@]}"
part trainer_125m_nomask "$T_125M_NOMASK" "$PY" -m pretrain bench configs/bench/gpu_125m.yaml "${DATA[@]}" "${TINY[@]}" \
  model.doc_masking=false model.reset_positions=false
part trainer_125m "$T_125M" "$PY" -m pretrain bench configs/bench/gpu_125m.yaml "${DATA[@]}" "${TINY[@]}"
part trainer_1b "$T_1B" "$PY" -m pretrain bench configs/bench/gpu_1b.yaml "${DATA[@]}" "${TINY[@]}"
part trainer_7b "$T_7B" "$PY" -m pretrain bench configs/bench/gpu_7b.yaml "${DATA[@]}" "${TINY[@]}"
wait "$PLANS"

{ for name in "${!STATUS[@]}"; do echo "$name=${STATUS[$name]}"; done; cat "$OUT/status.plan.txt"; } > "$OUT/status.txt"
{ for name in "${!SECS[@]}"; do echo "$name=${SECS[$name]}"; done; cat "$OUT/seconds.plan.txt"; } > "$OUT/seconds.txt"
"$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
status = dict(line.rstrip("\n").split("=", 1) for line in (out / "status.txt").read_text().splitlines())
secs = dict(line.rstrip("\n").split("=", 1) for line in (out / "seconds.txt").read_text().splitlines())

def load(name):
    text = (out / f"{name}.json").read_text().strip()
    return json.loads(text) if text else {}

def fmt(v, spec):
    return "-" if v is None else format(v, spec)

rows = ["| part | tokens/s | MFU | peak memory GiB | planned peak GiB | plan error | loader wait | step s | status | part s |",
        "|---|---|---|---|---|---|---|---|---|---|"]
m = load("model_vs_nanogpt")
for variant, tps in m.get("tokens_per_s", {}).items():
    rows.append(f"| model step {variant} | {fmt(tps, ',.0f')} | {fmt(m['mfu'].get(variant), '.3f')} | - | - | - | - | - |"
                f" {status['model_vs_nanogpt']} | {secs['model_vs_nanogpt']} |")
if not m:
    rows.append(f"| model step vs nanoGPT | - | - | - | - | - | - | - | {status['model_vs_nanogpt']} |"
                f" {secs['model_vs_nanogpt']} |")
for name, size in (("trainer_125m_nomask", None), ("trainer_125m", "125m"), ("trainer_1b", "1b"), ("trainer_7b", "7b")):
    r, plan = load(name), load(f"plan_{size}") if size else {}
    mem = r.get("memory_bytes")
    planned = plan["plans"][0]["total_bytes"] if plan.get("plans") else None
    error = (planned - mem) / mem if planned and mem else None
    plan_status = "" if size is None or status[f"plan_{size}"] == "ok" else f" (plan {status[f'plan_{size}']})"
    rows.append(f"| {name} | {fmt(r.get('tokens_per_s'), ',.0f')} | {fmt(r.get('mfu'), '.3f')} |"
                f" {fmt(mem / 2**30 if mem else None, '.1f')} | {fmt(planned / 2**30 if planned else None, '.1f')} |"
                f" {fmt(error, '+.1%')} | {fmt(r.get('loader_wait_frac'), '.4f')} |"
                f" {fmt(r.get('step_time_s_median'), '.3f')} | {status[name]}{plan_status} | {secs[name]} |")
base_name = m.get("nanogpt_baseline")
base = m.get("tokens_per_s", {}).get(base_name)
verdicts = []
for name, what, bar in (("trainer_125m_nomask", "without document masking", "bar 0.9x"),
                        ("trainer_125m", "with document masking", "reported beside it")):
    tps = load(name).get("tokens_per_s")
    if base and tps:
        verdicts.append(f"trainer 125M {what} / nanoGPT {base_name}: {tps / base:.2f}x ({bar})")
on_gpu = any(load(f"trainer_{size}").get("device", "").startswith("cuda") for size in ("125m", "1b", "7b"))
plan_note = ("plan error = (planned - measured) / measured peak (bar: within 15%)" if on_gpu
             else "plan error: a dry run's peak memory is the CPU process RSS, not comparable with a GPU plan")
budget_s = sum(int(secs[k]) for k in secs if not k.startswith("plan_"))
table = "\n".join([f"test-gpu: {status['test_gpu']} ({secs['test_gpu']} s); parts 1-3: {budget_s} s", "", *rows, "",
                   *verdicts, plan_note])
(out / "BENCH_GPU.md").write_text(table + "\n")
print(table)
PYEOF
grep -qv "=ok$" "$OUT/status.txt" && exit 1 || exit 0
