#!/usr/bin/env bash
# The GPU check, run from the repository root with OUT set to a folder for the logs: devices,
# the compiled kernel tests ($OUT/kernel_tests.log; the interpret-mode ones run in CI), the
# kernel benchmarks ($OUT/kernels_bench.log) and the model train steps beside timm's
# ($OUT/model_step.log, .jsonl). Each step runs whatever the one before did; the timeouts
# keep it all under 9 minutes (SIGINT, so pytest still prints its summary). Needs jax, flax,
# optax, numpy, absl and pytest (torch + timm for the timm column).
set -uo pipefail
: "${OUT:?set OUT to the folder for the logs}"
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}

echo "== devices"
nvidia-smi -L || echo "nvidia-smi failed"
"$PYTHON" -c 'import jax; print("jax", jax.__version__, jax.default_backend(), jax.devices())' \
  || echo "jax failed to list devices"

echo "== kernel tests"
timeout -s INT 170 "$PYTHON" -m pytest tests/test_dcnv3.py tests/test_contrastive.py -q -rs \
  -k "not interpret_mode and not reference_matches" --durations=10 2>&1 \
  | tee "$OUT/kernel_tests.log"
tests_status=${PIPESTATUS[0]}

echo "== kernel benchmarks"
timeout -s INT 150 "$PYTHON" -u -m benchmarks.kernels --sizes 4096,8192,16384,32768 \
  --time_up_to 16384 --dcn_batch 32 --repeats 5 2>&1 | tee "$OUT/kernels_bench.log"
bench_status=${PIPESTATUS[0]}

echo "== model train steps"
timeout -s INT 220 "$PYTHON" -u -m benchmarks.model_step --batch_size 64 --res 224 \
  --json_out "$OUT/model_step.jsonl" 2>&1 | tee "$OUT/model_step.log"
model_status=${PIPESTATUS[0]}

echo "== exit status: tests $tests_status, benchmarks $bench_status, models $model_status"
[ "$tests_status" = 0 ] && [ "$bench_status" = 0 ] && [ "$model_status" = 0 ]
