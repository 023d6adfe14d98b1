#!/usr/bin/env bash
# The accelerator benchmarks in one go, each step under its own time limit:
#   1. shrunk vs dense inference (ResNet20, VGG16; batch 256), plain ft and ft with stream-aware counts aligned to 8;
#   2. the benchmark suite (experiments/bench.py), one process per network so each writes its JSON.
# Usage (from the repository root, on the machine with the accelerator):
#   OUT=bench_gpu bash experiments/bench_gpu.sh
# Limits: SHRINK_S, SHRINK8_S, CHUNK_S (0 skips a step), BENCH_MODELS="model:seconds ..." (e.g. "resnet56:400" alone; "" for none).
# Writes $OUT/log.txt and one JSON per step. Needs nothing beyond requirements.txt (the CUDA jax build on a GPU).
set -u
OUT=${OUT:-bench_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PYTHON:-python3}
log() { echo "== $(date -u +%T) $*" | tee -a "$OUT/log.txt"; }
step() {  # step SECONDS ARGS...: one python -m call under a time limit (0: skipped), output appended to the log
    local limit=$1; shift
    if [ "$limit" = 0 ]; then log "skipped: $*"; return; fi
    log "$* (limit ${limit}s)"
    timeout "$limit" "$PY" -m "$@" >>"$OUT/log.txt" 2>&1 || log "exit $? for: $*"
    pkill -f "experiments.bench import _device_worker" 2>/dev/null || true  # a timed-out step's worker
}
log "environment"
"$PY" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" >>"$OUT/log.txt" 2>&1
nvidia-smi -L >>"$OUT/log.txt" 2>&1 || true
step "${SHRINK_S:-90}" experiments.bench_shrink --repeats=20 --json="$OUT/shrink.json"
step "${SHRINK8_S:-60}" experiments.bench_shrink --repeats=20 --round_to=8 --method_options='{"joint": "mean", "round_to": 8}' --json="$OUT/shrink_joint8.json"
for spec in ${BENCH_MODELS-lenet300_100:60 resnet20:170 resnet56:150}; do
    model=${spec%%:*}
    step "${BENCH_S:-${spec##*:}}" experiments.bench --models="$model" --device_models="$model" --memory_models="$model" --fused_models="$model" \
        --device_counts="${DEVICE_COUNTS-1}" --repeats=7 --budget_s=5 --json="$OUT/bench_$model.json"
done
# The pass with all of S in one chunk (a GPU has memory to spare; chunk 32 leaves it mostly idle), per-layer and fused.
step "${CHUNK_S:-100}" experiments.bench --models=resnet20 --chunk_size=256 --fused_models=resnet20 --device_counts= \
    --scaling_models= --prune_models= --methods=sipp --pfp_models= --repeats=7 --budget_s=5 --json="$OUT/bench_resnet20_chunk256.json"
log "done"
