#!/usr/bin/env bash
# The engine table on a GPU (issue 19): the llava-1.5-7b and qwen2.5-vl-7b shapes (random weights,
# measure/shapes.py) in fp16 on CUDA at batch 1, 32 and 128 -- model.generate with DynamicCache and
# with the static cache, dyrate none and FastV r=0.75 -- with CUDA synchronisation around every
# timing. Writes OUT/engine_table.txt (the tables) and OUT/engine_table.jsonl (one JSON line per row,
# each naming its config).
#
#   bash benchmarks/gpu.sh runs/gpu
#
# Every setting can be overridden from the environment, e.g. the CPU smoke test of tests/test_bench.py:
#   CONFIGS=medium LAYERS=3 BATCH=1 DEVICE=cpu DTYPE=float32 NEW_TOKENS=2 REPEATS=1 bash benchmarks/gpu.sh OUT
set -euo pipefail
OUT=${1:-runs/gpu}
PY=${PY:-.venv/bin/python}
CONFIGS=${CONFIGS:-${CONFIG:-llava-1.5-7b qwen2.5-vl-7b}}
LAYERS=${LAYERS:-}
BATCH=${BATCH:-1,32,128}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-float16}
NEW_TOKENS=${NEW_TOKENS:-64}
REPEATS=${REPEATS:-3}
POLICY=${POLICY:-fastv:k=2,r=0.75}
mkdir -p "$OUT"
: > "$OUT/engine_table.txt"
for CONFIG in $CONFIGS; do
  "$PY" benchmarks/engine_table.py --config "$CONFIG" ${LAYERS:+--layers "$LAYERS"} --batch "$BATCH" --device "$DEVICE" \
    --dtype "$DTYPE" --new-tokens "$NEW_TOKENS" --repeats "$REPEATS" --policy "$POLICY" | tee -a "$OUT/engine_table.txt"
done
grep '^{' "$OUT/engine_table.txt" > "$OUT/engine_table.jsonl"
