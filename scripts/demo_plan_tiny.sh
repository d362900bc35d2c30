#!/usr/bin/env bash
# The afm-plan demo of docs/plan.md on the bundled tiny teacher, one batch:
#   1. per-layer sensitivity on toyworld_arith (tiny-stress chip, PCM x3, 3 noise seeds);
#   2. a placement for at most MAX_DROP points below FP, ranked by step 1, verified on
#      the held-out half (odd problems) with fresh noise seeds 3-5;
#   3. per-block KL sensitivity on toy-world text and a placement for MAX_KL nats/token;
#   4. cost tables: tiny, Phi-3-mini, Llama-3.2-1B on HERMES (digital and analog head,
#      a faster digital unit), Mixtral-8x7B on the 3D chip, tiny with the placement.
# Run it under the shared lock: flock /tmp/afm-heavy.lock scripts/demo_plan_tiny.sh
set -u -o pipefail
OUT=${OUT:-eval/results/tiny-plan}
MAX_DROP=${MAX_DROP:-2}
MAX_KL=${MAX_KL:-0.006}
COMMON=(--model tiny --preset tiny-stress --seeds 3 --threads 1 --quiet)
mkdir -p "$OUT"
step() {  # name, command...: runs it, prints its wall time and exit status
    local name=$1 t0 rc
    shift
    t0=$(date +%s)
    "$@"
    rc=$?
    echo "== $name: rc=$rc, $(($(date +%s) - t0)) s" >&2
}
step arith-sensitivity afm-plan sensitivity "${COMMON[@]}" --task toyworld_arith --out "$OUT/arith"
step arith-place afm-plan place "${COMMON[@]}" --task toyworld_arith --max-drop "$MAX_DROP" \
    --sensitivity "$OUT/arith/sensitivity.json" --out "$OUT/arith"
step kl-sensitivity afm-plan sensitivity "${COMMON[@]}" --texts toyworld --metric kl \
    --units blocks --out "$OUT/blocks-kl"
step kl-place afm-plan place "${COMMON[@]}" --texts toyworld --metric kl --units blocks \
    --max-kl "$MAX_KL" --sensitivity "$OUT/blocks-kl/sensitivity.json" --out "$OUT/blocks-kl"
MODELS=(--model tiny --model phi-3-mini --model llama-3.2-1b)
step cost-hermes afm-plan cost "${MODELS[@]}" --chip hermes --out "$OUT/cost-hermes"
step cost-hermes-analog-head afm-plan cost "${MODELS[@]}" --chip hermes --analog-head \
    --out "$OUT/cost-hermes-analog-head"
step cost-hermes-fast-digital afm-plan cost "${MODELS[@]}" --chip hermes \
    --chip-file "$OUT/chip-fast-digital.yaml" --out "$OUT/cost-hermes-fast-digital"
step cost-3d-sim afm-plan cost "${MODELS[@]}" --model mixtral-8x7b --chip 3d-sim \
    --out "$OUT/cost-3d-sim"
placement=$(ls "$OUT"/arith/placement*.json | head -1)
step cost-placement afm-plan cost --model tiny --chip hermes --placement "$placement" \
    --out "$OUT/cost-hermes-placement"
