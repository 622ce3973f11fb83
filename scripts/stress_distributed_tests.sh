#!/usr/bin/env bash
# Runs the sharding and two-process tests N times in a row (default 20) and stops at the first
# failure: the evidence that they do not flake on a 2-core CPU with 8 fake devices.
#   bash scripts/stress_distributed_tests.sh [N] [extra test files, e.g. tests/test_resume.py]
set -uo pipefail
n=${1:-20}
cd "$(dirname "$0")/.."
for i in $(seq 1 "$n"); do
  start=$(date +%s)
  if ! python -m pytest -q -p no:cacheprovider tests/test_sharding.py tests/test_multiprocess.py \
       "${@:2}" > "/tmp/stress-run-$i.log" 2>&1; then
    echo "run $i: FAILED (see /tmp/stress-run-$i.log)"; tail -5 "/tmp/stress-run-$i.log"; exit 1
  fi
  echo "run $i: $(tail -1 "/tmp/stress-run-$i.log") [$(( $(date +%s) - start )) s]"
done
echo "stress: $n of $n runs passed"
