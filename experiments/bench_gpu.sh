#!/usr/bin/env bash
# The accelerator benchmarks in one go, each step under its own time limit:
#   1. shrunk vs dense inference (ResNet20, VGG16; batch 256), plain ft and ft with stream-aware counts aligned to 8;
#   2. per network: the first sp.prune call of a fresh process (tracing / compiles / pass / search), then the
#      pass vs forward, prune end to end, masked train step, memory and a 1-device mesh (one JSON per benchmark);
#   3. the pass with all of S in one chunk (ResNet20), per-layer and fused;
#   4. $OUT/benchmarks.md from all the JSON (python -m experiments.bench.report).
# Usage (from the repository root, on the machine with the accelerator):
#   OUT=/tmp/bench_gpu bash experiments/bench_gpu.sh
# Limits: SHRINK_S, SHRINK8_S, CHUNK_S, FIRST_S (0 skips a step), BENCH_MODELS="model:seconds ..." (e.g.
# "resnet56:400" alone; "" for none). Writes $OUT/log.txt and $OUT/<benchmark>_<tag>.json (each benchmark's JSON
# is written as soon as it finishes, so a step cut by its limit keeps what it completed). Needs nothing beyond
# requirements.txt (the CUDA jax build on a GPU). Copy the results into the docs with
#   python -m experiments.bench.report --input="$OUT" --output=docs/benchmarks.md
set -u
OUT=${OUT:-/tmp/bench_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PYTHON:-python3}
log() { echo "== $(date -u +%T) $*" | tee -a "$OUT/log.txt"; }
step() {  # step SECONDS ARGS...: one python -m call under a time limit (0: skipped), output appended to the log
    local limit=$1; shift
    if [ "$limit" = 0 ]; then log "skipped: $*"; return; fi
    log "$* (limit ${limit}s)"
    # timeout signals its whole process group: fresh-process workers of a timed-out step end with it.
    timeout "$limit" "$PY" -m "$@" >>"$OUT/log.txt" 2>&1 || log "exit $? for: $*"
}
log "environment"
"$PY" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" >>"$OUT/log.txt" 2>&1
nvidia-smi -L >>"$OUT/log.txt" 2>&1 || true
step "${SHRINK_S:-90}" experiments.bench --benchmarks=shrink --repeats=20 --budget_s=20 --out="$OUT" --tag=ft
step "${SHRINK8_S:-60}" experiments.bench --benchmarks=shrink --repeats=20 --budget_s=20 --shrink_round_to=8 \
    --shrink_method_options='{"joint": "mean", "round_to": 8}' --out="$OUT" --tag=joint8
for spec in ${BENCH_MODELS-lenet300_100:60 resnet20:170 resnet56:150}; do
    model=${spec%%:*}
    step "${FIRST_S:-120}" experiments.bench --benchmarks=first_call --first_call_models="$model" --out="$OUT" --tag="$model"
    step "${BENCH_S:-${spec##*:}}" experiments.bench --benchmarks=passes,prune,train_step,memory,mesh --models="$model" \
        --device_models="$model" --memory_models="$model" --fused_models="$model" \
        --device_counts="${DEVICE_COUNTS-1}" --repeats=7 --budget_s=5 --out="$OUT" --tag="$model"
done
# The pass with all of S in one chunk (a GPU has memory to spare; chunk 32 leaves it mostly idle), per-layer and fused.
step "${CHUNK_S:-100}" experiments.bench --benchmarks=passes --models=resnet20 --chunk_size=256 --fused_models=resnet20 \
    --scaling_models= --repeats=7 --budget_s=5 --out="$OUT" --tag=resnet20_chunk256
step 60 experiments.bench.report --input="$OUT" --output="$OUT/benchmarks.md"
log "done"
