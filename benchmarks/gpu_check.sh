#!/usr/bin/env bash
# The GPU check, run from the repository root with OUT set to a folder for the logs: devices,
# the kernel tests ($OUT/kernel_tests.log), the kernel benchmarks ($OUT/kernels_bench.log).
# Each step runs whatever the one before did; the timeouts keep it all under 6 minutes
# (SIGINT, so pytest still prints its summary). Needs only jax, numpy, absl and pytest.
set -uo pipefail
: "${OUT:?set OUT to the folder for the logs}"
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}

echo "== devices"
nvidia-smi -L || echo "nvidia-smi failed"
"$PYTHON" -c 'import jax; print("jax", jax.__version__, jax.default_backend(), jax.devices())' \
  || echo "jax failed to list devices"

echo "== kernel tests"
timeout -s INT 200 "$PYTHON" -m pytest tests/test_dcnv3.py tests/test_contrastive.py -q -rs \
  --durations=10 2>&1 | tee "$OUT/kernel_tests.log"
tests_status=${PIPESTATUS[0]}

echo "== kernel benchmarks"
timeout -s INT 150 "$PYTHON" -u -m benchmarks.kernels --sizes 4096,8192,16384,32768 \
  --time_up_to 16384 --dcn_batch 32 --repeats 5 2>&1 | tee "$OUT/kernels_bench.log"
bench_status=${PIPESTATUS[0]}

echo "== exit status: tests $tests_status, benchmarks $bench_status (124: timed out)"
[ "$tests_status" = 0 ] && [ "$bench_status" = 0 ]
