#!/usr/bin/env bash
# Issue 19's accelerator figures in one run, each line `name: value`, with the device name.
#
#   bash scripts/bench_gpu.sh                  # full size (a GPU: batch 131072, 1M/20M rows)
#   BENCH_SMALL=1 bash scripts/bench_gpu.sh    # minutes on a CPU: same steps, small sizes
#
# 1. MF examples/s at 1M and 20M rows per table (batch 131072, d 64, row-wise Adagrad), the
#    trainer's own step (scripts/bench_train.py, `single` mesh);
# 2. the hand-written plain-JAX MF step at the same sizes (scripts/bench_handwritten_mf.py)
#    and mf_vs_handwritten_ratio_<rows> (target >= 0.9), mf_vs_handwritten_ratio = the lower;
# 3. embedding+MLP examples/s: `experiment=synthetic_ctr` trained for one epoch (synthetic
#    data generated here, no network), perf/examples_per_sec from its metrics.json;
# 4. sequential-model examples/s: scripts/bench_train.py --sequential when it exists;
# 5. iALS seconds per epoch on ML-1M (scripts/bench_ials.py, with `implicit` beside it; it
#    falls back to ML-1M-shaped synthetic positives when ML-1M is not prepared).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
LOG=$(mktemp -d)
trap 'rm -rf "$LOG"' EXIT

if [[ "${BENCH_SMALL:-0}" == 1 ]]; then
  ROWS=(10000 100000); BATCH=4096; STEPS=5; REPEATS=2
  CTR_N=200000; CTR_BATCH=4096; IALS_ARGS=(--synthetic --dims 64 --epochs 2)
else
  ROWS=(1000000 20000000); BATCH=131072; STEPS=30; REPEATS=5
  CTR_N=10000000; CTR_BATCH=131072; IALS_ARGS=(--dims 64 192 --epochs 4)
fi

echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
$PY -c 'import jax; d = jax.devices()[0]; print(f"device: {d.device_kind} ({d.platform}) x{jax.device_count()}")'
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | sed 's/^/gpu: /' || true

# ---------------------------------------------------------------- 1-2. MF vs hand-written
$PY scripts/bench_train.py --rows "${ROWS[@]}" --batch "$BATCH" --dim 64 --optimizer adagrad \
    --meshes --devices 1 --steps "$STEPS" --repeats "$REPEATS" | tee "$LOG/mf.txt"
$PY scripts/bench_handwritten_mf.py --rows "${ROWS[@]}" --batch "$BATCH" --dim 64 \
    --steps "$STEPS" --repeats "$REPEATS" | tee "$LOG/hw.txt"
awk -F': ' '
  FNR == NR && $1 ~ /^mf_examples_per_s_rows_/ { sub("mf_examples_per_s_rows_", "", $1); mf[$1] = $2 }
  FNR != NR && $1 ~ /^handwritten_examples_per_s_/ { sub("handwritten_examples_per_s_", "", $1); hw[$1] = $2 }
  END {
    lo = ""; for (r in hw) { if (!(r in mf)) { print "missing MF figure for " r " rows" > "/dev/stderr"; exit 1 }
      x = mf[r] / hw[r]; printf "mf_vs_handwritten_ratio_%s: %.3f\n", r, x; if (lo == "" || x < lo) lo = x }
    printf "mf_vs_handwritten_ratio: %.3f\n", lo }' "$LOG/mf.txt" "$LOG/hw.txt"

# ---------------------------------------------------------------- 3. embedding + MLP
JAXRECO_CACHE="$LOG/cache" $PY -m jaxreco.cli.train experiment=synthetic_ctr \
    dataset.num_interactions="$CTR_N" trainer.epochs=1 trainer.batch_size="$CTR_BATCH" \
    trainer.progress_bar=false trainer.checkpoint=false logger.tensorboard=false \
    hydra.run.dir="$LOG/ctr" > "$LOG/ctr.log" 2>&1 || { tail -20 "$LOG/ctr.log"; exit 1; }
$PY -c 'import json, sys; m = json.load(open(sys.argv[1])); k = "perf/examples_per_sec"; print(f"embed_mlp_examples_per_s: {m[k]:.0f}  (synthetic_ctr, batch {sys.argv[2]}, 1 epoch, compile included)")' \
    "$LOG/ctr/metrics.json" "$CTR_BATCH"

# ---------------------------------------------------------------- 4. sequential model
if $PY scripts/bench_train.py --help 2>/dev/null | grep -q -- "--sequential"; then
  $PY scripts/bench_train.py --sequential --batch "$BATCH" --devices 1 \
      --steps "$STEPS" --repeats "$REPEATS" | grep -i "sequential\|seq_"
else
  echo "sequential_examples_per_s: missing (scripts/bench_train.py has no --sequential yet)"
fi

# ---------------------------------------------------------------- 5. iALS epoch
$PY scripts/bench_ials.py "${IALS_ARGS[@]}" | grep -E "^(data|device|split|jaxreco_|implicit_|ials_)" || true
