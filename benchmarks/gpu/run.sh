#!/usr/bin/env bash
# GPU benchmark: fisher-lora init vs the floor vs PEFT LoRA-GA on a Llama-3-8B-shaped model.
#
#   benchmarks/gpu/run.sh                          # H200: random Llama-3-8B weights in bf16, 64×2048 tokens
#   PRESET=tiny BATCHES=2 SEQ_LEN=32 DTYPE=fp32 benchmarks/gpu/run.sh   # CPU smoke run
#
# Nothing is downloaded: the model is built from a LlamaConfig with random weights. Each method runs
# in its own process (one `benchmarks.speed.worker` call: CUDA-synchronized wall time, peak memory
# above the model and batches from torch.cuda.max_memory_allocated) under a timeout, so the whole
# script ends within BUDGET_S seconds even when a method is slow or runs out of memory; a method cut
# short is reported as such with its last log lines (fisher-lora logs its statistics time and peak
# before selecting). Results: one line per method, then a summary with ratios to the floor and to
# LoRA-GA; the raw JSON lines are kept in $OUT_DIR/results.jsonl.
#
# Environment (defaults): PRESET (llama3-8b; see benchmarks/speed/workload.py), LAYERS (the preset's),
# BATCHES (64), BATCH_SIZE (1), SEQ_LEN (2048), DTYPE (bf16), RANK (16), METHODS ("floor lora_ga
# fisher"), DEVICE (cuda if available, else cpu), BUDGET_S (450), RESERVE_S (120: seconds kept for
# each later method), PROFILE (1: fisher's phase/eigh/svd breakdown), FISHER_SET (FisherConfig
# overrides, e.g. "solver=lowrank memory_budget=20000000000"), PYTHON (python3), OUT_DIR (a new
# temporary folder).
set -uo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python3}
PRESET=${PRESET:-llama3-8b}
BATCHES=${BATCHES:-64}
BATCH_SIZE=${BATCH_SIZE:-1}
SEQ_LEN=${SEQ_LEN:-2048}
DTYPE=${DTYPE:-bf16}
RANK=${RANK:-16}
METHODS=${METHODS:-floor lora_ga fisher}
BUDGET_S=${BUDGET_S:-450}
RESERVE_S=${RESERVE_S:-120}
PROFILE=${PROFILE:-1}
OUT_DIR=${OUT_DIR:-$(mktemp -d)}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ -z "${DEVICE:-}" ]; then
  DEVICE=$("$PYTHON" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')" 2>/dev/null) || {
    echo "error: $PYTHON cannot import torch; set PYTHON to an interpreter with torch, transformers, peft" >&2
    exit 2
  }
fi
if [ "$DEVICE" = cpu ]; then
  echo "note: CUDA is not available: running on CPU (times and memory are CPU figures, not GPU ones)"
  case "$PRESET" in llama3-*)
    echo "error: PRESET=$PRESET on CPU would need tens of GB and hours; set PRESET=tiny (or small) for a CPU run" >&2
    exit 2 ;;
  esac
fi

LAYER_ARGS=()
[ -n "${LAYERS:-}" ] && LAYER_ARGS=(--layers "$LAYERS")
read -r -a METHOD_LIST <<< "$METHODS"
RESULTS="$OUT_DIR/results.jsonl"
: > "$RESULTS"
echo "fisher-lora GPU benchmark: preset $PRESET, $BATCHES × $BATCH_SIZE × $SEQ_LEN tokens, $DTYPE, rank $RANK," \
     "device $DEVICE, budget ${BUDGET_S}s, logs in $OUT_DIR"
START=$SECONDS
for i in "${!METHOD_LIST[@]}"; do
  method=${METHOD_LIST[$i]}
  later=$(( ${#METHOD_LIST[@]} - i - 1 ))
  limit=$(( BUDGET_S - (SECONDS - START) - later * RESERVE_S ))
  [ "$limit" -lt 30 ] && limit=30
  extra=()
  [ "$PROFILE" = 1 ] && [[ "$method" == fisher* ]] && extra=(--profile)
  [ -n "${FISHER_SET:-}" ] && [[ "$method" == fisher* ]] && read -r -a fset <<< "$FISHER_SET" && extra+=(--fisher-set "${fset[@]}")
  log="$OUT_DIR/$method.log"
  timeout --signal=TERM --kill-after=15 "$limit" "$PYTHON" -m benchmarks.speed.worker --method "$method" \
    --preset "$PRESET" "${LAYER_ARGS[@]}" --batches "$BATCHES" --batch-size "$BATCH_SIZE" --seq-len "$SEQ_LEN" \
    --rank "$RANK" --device "$DEVICE" --dtype "$DTYPE" "${extra[@]}" > "$log" 2>&1
  rc=$?
  if grep -q '^RESULT ' "$log"; then
    grep '^RESULT ' "$log" | sed 's/^RESULT //' >> "$RESULTS"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "{\"method\": \"$method\", \"error\": \"did not finish within ${limit}s\"}" >> "$RESULTS"
  else
    reason=$(grep -E 'Error|error' "$log" | tail -n 1 | tr '"\\' "'/" | cut -c1-300)
    echo "{\"method\": \"$method\", \"error\": \"exit $rc: ${reason:-see $log}\"}" >> "$RESULTS"
  fi
  "$PYTHON" -m benchmarks.gpu.summarize --line "$RESULTS"
  grep -h 'fisher-lora:' "$log" | sed 's/^/    /'
done
echo
"$PYTHON" -m benchmarks.gpu.summarize "$RESULTS"
echo "total ${SECONDS}s"
