#!/usr/bin/env bash
# Re-measure every held-out table of the docs on the *shipped* testbed model, in order, one job at
# a time (two 2-thread jobs on a 2-core CPU slow each other far more than 2x). Run it after a new
# model is copied into src/dyrate/assets/testbed/; it retrains the shipped predictors too.
#
#   bash benchmarks/testbed_tables.sh runs/ship      # OUT: a fresh folder (eval runs resume from old samples)
#
# About an hour on the 2-core CPU. What each step feeds:
#   quality.json + testbed.md quality table   <- OUT/eval.json, OUT/blank.json
#   testbed.md "pruning behaves like a real VLM's" <- OUT/oracle_pruning.txt
#   testbed.md attention-share figure          <- docs/img/testbed_shares.{png,json}
#   shipped predictors                          <- OUT/pred/*.safetensors (copied into assets)
#   dyrate.md / benchmarks.md evict table       <- OUT/abl-evict/table.md
#   dyrate.md mask table, per-token tables      <- OUT/abl-mask/table.md, OUT/abl-q/table.md, OUT/heldout-q/table.md
#   dyrate.md decoding table                    <- OUT/abl-dec-*/table.md
#   dyrate.md rate figure                       <- docs/img/dyrate_rate.{png,json}
set -euo pipefail
OUT=${1:?usage: bash benchmarks/testbed_tables.sh OUT}
PY=${PY:-.venv/bin/python}
DY=${DY:-.venv/bin/dyrate}
ASSETS=src/dyrate/assets/testbed
mkdir -p "$OUT/pred"
step() { echo "== $(date +%H:%M:%S) $*" >&2; }

step "held-out data (seed 1, 300 scenes)"
[ -d runs/heldout300 ] || $DY testbed data --seed 1 --n 300 --out runs/heldout300

step "quality (300 scenes) and blank images (100)"
$DY testbed eval --model "$ASSETS" --n 300 --seed 1 --threads 2 --json "$OUT/eval.json"
$DY testbed eval --model "$ASSETS" --n 100 --seed 1 --threads 2 --blank --json "$OUT/blank.json"

step "pruning realism (40 scenes)"
$PY research/testbed_oracle_pruning.py --n 40 --threads 2 | tee "$OUT/oracle_pruning.txt"

step "attention shares figure"
$DY analyze --data runs/heldout300 --limit 100 --out docs/img/testbed_shares.png

step "predictors: constant-budget (KL objective) and per-token (oracle labels, hidden feature, prefill rank)"
common="--testbed --samples 384 --steps 300 --batch 8 --max-new-tokens 64 --k 2 --bins 10"
$DY train-predictor $common --arch mlp --target-keep 0.3 --out "$OUT/pred/mlp-30.safetensors"
$DY train-predictor $common --arch mlp --target-keep 0.2 --out "$OUT/pred/mlp-20.safetensors"
$DY train-predictor $common --arch gru --history 8 --target-keep 0.3 --out "$OUT/pred/gru-30.safetensors"
$DY train-predictor $common --arch gru --history 8 --target-keep 0.2 --out "$OUT/pred/gru-20.safetensors"
oracle="--testbed --samples 384 --max-new-tokens 64 --batch 16 --steps 300 --lr 3e-3 --objective oracle --oracle-kl 0.005 --lambda 0 --features shares,hidden --rank prefill"
$DY train-predictor $oracle --arch mlp --out "$OUT/pred/mlp-hidden-prefill.safetensors"
$DY train-predictor $oracle --arch gru --out "$OUT/pred/gru-hidden-prefill.safetensors"
strict="${oracle/--oracle-kl 0.005/--oracle-kl 0.001}"   # D = 0.001: the setting chosen on validation (dyrate.md)
$DY train-predictor $strict --arch mlp --out "$OUT/pred/mlp-hidden-prefill-kl0.001.safetensors"
$DY train-predictor $strict --arch gru --out "$OUT/pred/gru-hidden-prefill-kl0.001.safetensors"
$DY train-predictor ${oracle/--oracle-kl 0.005/--oracle-kl 0.0003} --arch gru --out "$OUT/pred/gru-hidden-prefill-kl0.0003.safetensors"
step "progressive predictors (hidden state + step, prefill ranking, shrinking labels): the defaults of dyrate / dyrate-rnn"
$PY research/dyrate_oracle_sweep.py --out "$OUT/shrink" --samples 384 --kl 0.001,0.003,0.01 --features hidden+step \
  --arch mlp,gru --rank prefill --decide shrink --steps 300 --batch 16 --max-new-tokens 64 --threads 2
# settings chosen on the validation set (docs/dyrate.md, "Progressive eviction without a probe")
$PY research/ship_predictor.py "$OUT/shrink/mlp-hidden-step-prefill-shrink-kl0.001.safetensors" --q 0.05 --cap 0.5 --every 8 \
  --out "$ASSETS/predictors/mlp.safetensors"
$PY research/ship_predictor.py "$OUT/shrink/gru-hidden-step-prefill-shrink-kl0.001.safetensors" --q 0.05 --cap 0.6 \
  --out "$ASSETS/predictors/gru.safetensors"
cp "$OUT/pred/mlp-hidden-prefill.safetensors" "$OUT/pred/gru-hidden-prefill.safetensors" \
   "$OUT/pred/gru-hidden-prefill-kl0.001.safetensors" "$ASSETS/predictors/"

P=$OUT/pred
step "rate strategies, evict mode (300 captions, 600 questions per file)"
$PY benchmarks/testbed_table.py --data runs/heldout300 --out "$OUT/abl-evict" --captions 300 --questions 600 --threads 2 \
  --policies "none;fastv:k=2,r=0.5;fastv:k=2,r=0.75;fastv:k=2,r=0.9;random:k=2,r=0.5;random:k=2,r=0.75;schedule:2=0.5,4=0.9;schedule:2=0.75,4=0.95;vtw:k=2;vtw:k=3;vtw:k=4;dyrate:k=2,predictor=$P/mlp-30.safetensors;dyrate:k=2,predictor=$P/mlp-20.safetensors;dyrate-rnn:k=2,predictor=$P/gru-30.safetensors;dyrate-rnn:k=2,predictor=$P/gru-20.safetensors"

step "evict vs mask (300 captions, 300 questions per file)"
$PY benchmarks/testbed_table.py --data runs/heldout300 --out "$OUT/abl-mask" --mode mask --captions 300 --questions 300 --threads 2 \
  --policies "none;fixed:k=2,r=0.7;fixed:k=2,r=0.75;fastv:k=2,r=0.7;fastv:k=2,r=0.75;dyrate:k=2,predictor=$P/mlp-30.safetensors"

step "per-token predictors, mask mode (300 captions, 600 questions per file)"
$PY benchmarks/testbed_table.py --data runs/heldout300 --out "$OUT/abl-q" --mode mask --captions 300 --questions 600 --threads 2 \
  --policies "none;dyrate:k=2,predictor=$P/mlp-hidden-prefill.safetensors,q=0.05;dyrate:k=2,predictor=$P/mlp-hidden-prefill.safetensors,q=0.15;dyrate:k=2,predictor=$P/mlp-hidden-prefill.safetensors,q=0.3;dyrate-rnn:k=2,predictor=$P/gru-hidden-prefill.safetensors,q=0.15"

step "the per-token settings chosen on validation, and FastV between the evict table's rates (mask mode)"
$PY benchmarks/testbed_table.py --data runs/heldout300 --out "$OUT/heldout-q" --mode mask --captions 300 --questions 600 --threads 2 \
  --policies "none;dyrate-rnn:k=2,predictor=$P/gru-hidden-prefill-kl0.001.safetensors,q=0.15;dyrate-rnn:k=2,predictor=$P/gru-hidden-prefill-kl0.001.safetensors,q=0.05;dyrate:k=2,predictor=$P/mlp-hidden-prefill-kl0.001.safetensors,q=0.15;fastv:k=2,r=0.6;fastv:k=2,r=0.85;dyrate-rnn:k=2,predictor=$P/gru-hidden-prefill-kl0.0003.safetensors,q=0.2"

step "decoding (100 captions, 150 questions per file)"
for dec in "" "--num-beams 2" "--num-beams 5" "--top-p 0.9"; do
  name=$(echo "greedy$dec" | tr -d ' -')
  $PY benchmarks/testbed_table.py --data runs/heldout300 --out "$OUT/abl-dec-$name" --captions 100 --questions 150 --threads 2 $dec \
    --policies "none;fastv:k=2,r=0.7;dyrate:k=2,predictor=$P/mlp-30.safetensors"
done

step "DyRate rate figure"
$DY analyze --data runs/heldout300 --mode mask --limit 50 --out docs/img/dyrate_rate.png \
  --policy "dyrate:k=2,predictor=$ASSETS/predictors/mlp-hidden-prefill.safetensors,q=0.15"
step "done"
