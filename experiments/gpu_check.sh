#!/usr/bin/env bash
# GPU numbers in one prepared run (issue 17 item 5): `make gpu-check` on a machine with one GPU, or by hand:
#
#     DEVICE=cuda bash experiments/gpu_check.sh            # < 8 min on one H200, nothing else running
#     DEVICE=cpu SMOKE=1 bash experiments/gpu_check.sh     # CI smoke test: small, eager, no compiled steps
#
# Needs only torch, numpy and pytest (a bare GPU box: no Ray, ogbench, gymnasium, mlflow, pandas).  Runs, each step
# under its own time limit so the whole stays inside its budget and a failed step does not hide the others:
#   1. the core tests that need only torch + numpy, on DEVICE (QAM_RAY_TEST_DEVICE; tests/test_compile.py runs
#      eager and compiled updates there, the math tests run on CPU as they are written)
#   2. every fixture's reference check on DEVICE, eager, TF32 off (reference_check sets it for CUDA)
#   3. the plain benchmark of every method at full size, eager
#   4. the plain benchmark of COMPILE_METHODS at full size in eager / compiled / CUDA-graph modes, in turns
#   5. QAM at full size in 1, 4 and 8 packed processes sharing the device (`benchmark.py --pack`)
#   6. the reference checks of COMPILE_FIXTURES with the losses compiled ("default"), TF32 off
# writing results/gpu/*.json (OUT, one file per benchmark step), each step's log and summary.json (every
# step's exit status and seconds).  Exit status: 1 if any step failed or ran out of time.
set -u
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
SMOKE=${SMOKE:-0}
OUT=${OUT:-results/gpu}
export QAM_RAY_TEST_DEVICE=$DEVICE
ALL_METHODS=$($PYTHON -c "from qam_ray.agents import METHOD_NAMES; print(' '.join(METHOD_NAMES))") || exit 1
if [ "$SMOKE" = 1 ]; then  # every step once, at its smallest
  SIZE=small STEPS=2 REPEATS=1 PACK="1 2" PACK_METHOD=FQL BENCH_METHODS="FQL" COMPILE_METHODS=""
  FIXTURES="tests/fixtures/fql_small.npz" COMPILE_FIXTURES="" TESTS="tests/test_compile.py"
  TEST_FILTER="refused or plain_method"  # no compilation: inductor alone would take minutes on a small CPU
  LIMITS=(120 120 120 120 120 120)  # generous: a shared 2-core CI machine starts Python slowly
else
  SIZE=full STEPS=${STEPS:-10} REPEATS=${REPEATS:-3} PACK="1 4 8" PACK_METHOD=QAM BENCH_METHODS=$ALL_METHODS
  COMPILE_METHODS=${COMPILE_METHODS:-"QAM FQL"} COMPILE_MODES="none default reduce-overhead"
  FIXTURES=$(ls tests/fixtures/*.npz) TESTS="tests/test_closed_form.py tests/test_replay.py tests/test_compile.py"
  TEST_FILTER="not gpu_check"  # (this script's own smoke test)
  export QAM_RAY_COMPILE_METHODS=${QAM_RAY_COMPILE_METHODS:-FQL} QAM_RAY_COMPILE_FIXTURES=""  # fixtures: step 6
  COMPILE_FIXTURES=${COMPILE_FIXTURES:-"tests/fixtures/qam_small.npz tests/fixtures/fql_small.npz"}
  LIMITS=(75 45 90 135 60 60)  # seconds per step: 465 in all, inside the 8-minute budget
fi
mkdir -p "$OUT"
BENCH="$PYTHON experiments/benchmark.py --plain-only --device $DEVICE --size $SIZE --steps $STEPS --repeats $REPEATS"
STEPS_RUN=()
failed=0

step() {  # step NAME LIMIT COMMAND...: run under `timeout`, log to $OUT/NAME.log, record status and seconds
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 15 "$OUT/$name.log"
  echo "-- $name: exit $rc after $((SECONDS - start)) s"
  STEPS_RUN+=("{\"step\": \"$name\", \"exit\": $rc, \"seconds\": $((SECONDS - start)), \"limit_s\": $limit}")
  [ $rc -eq 0 ] || failed=1
}

step core_tests "${LIMITS[0]}" $PYTHON -m pytest -q --noconftest -p no:cacheprovider $TESTS -k "$TEST_FILTER"
step reference_checks "${LIMITS[1]}" $PYTHON -m qam_ray.reference_check $FIXTURES --device "$DEVICE"
step benchmark_eager "${LIMITS[2]}" $BENCH --methods $BENCH_METHODS --json "$OUT/benchmark_${SIZE}_eager.json"
if [ -n "$COMPILE_METHODS" ]; then
  step benchmark_compile "${LIMITS[3]}" $BENCH --methods $COMPILE_METHODS --compile $COMPILE_MODES \
    --json "$OUT/benchmark_${SIZE}_compile.json"
fi
step benchmark_pack "${LIMITS[4]}" $BENCH --methods $PACK_METHOD --pack $PACK --json "$OUT/benchmark_${SIZE}_pack.json"
if [ -n "$COMPILE_FIXTURES" ]; then
  step reference_checks_compiled "${LIMITS[5]}" $PYTHON -m qam_ray.reference_check $COMPILE_FIXTURES \
    --device "$DEVICE" --compile default
fi

(IFS=,; echo "{\"device\": \"$DEVICE\", \"smoke\": $SMOKE, \"failed\": $failed, \"steps\": [${STEPS_RUN[*]}]}") \
  > "$OUT/summary.json"
echo "summary: $OUT/summary.json (failed=$failed)"
exit $failed
