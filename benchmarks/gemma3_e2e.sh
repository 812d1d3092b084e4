#!/usr/bin/env bash
# Issue 18: Gemma 3 270M end to end on healthcare (prepare, prune, eval, bench) at a small CPU budget.
#   ATP_HOME=.atp_home nohup bash benchmarks/gemma3_e2e.sh > runs/gemma3.log 2>&1 &
# Rows: dense (no training), dense + LoRA, ATP 40% of the decoder blocks; all with the same training settings.
# STEPS, BATCH, LENGTH and LIMIT (records per dev task) may be set in the environment.
set -euo pipefail
ATP=${ATP:-.venv/bin/atp}
OUT=${OUT:-runs/gemma3}
STEPS=${STEPS:-40} BATCH=${BATCH:-4} LENGTH=${LENGTH:-128} LIMIT=${LIMIT:-50}
mkdir -p "$OUT"
train=(--model gemma3-270m --domain healthcare --max-steps "$STEPS" --batch-size "$BATCH" --max-length "$LENGTH"
       --lr 6e-4 --mlp-block 32 --save-every 0 --overwrite)
"$ATP" prepare --model gemma3-270m
"$ATP" eval --model gemma3-270m --domain healthcare --limit "$LIMIT" --out "$OUT/dense.json"
"$ATP" prune "${train[@]}" --no-prune --out "$OUT/dense-lora"
"$ATP" eval --model "$OUT/dense-lora/model" --domain healthcare --limit "$LIMIT" --out "$OUT/dense-lora.json"
"$ATP" prune "${train[@]}" --sparsity 0.4 --out "$OUT/atp40"
"$ATP" eval --model "$OUT/atp40/model" --domain healthcare --limit "$LIMIT" --out "$OUT/atp40.json"
"$ATP" bench --model "$OUT/dense-lora/model" --model "$OUT/atp40/model" --repeats 3 --out "$OUT/bench.json"
