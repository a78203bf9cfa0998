#!/usr/bin/env bash
# The GPU check (issue "GPU speed"), run from the repository root with OUT set to a folder for
# the logs:  OUT=/tmp/gpu benchmarks/gpu_check.sh [SECTION ...]
# Sections, in order (default: all; name some to rerun only those in a short device slot):
#   kernel_tests  compiled DCNv3 / contrastive tests ($OUT/kernel_tests.log; interpret-mode
#                 ones run in CI)
#   kernels       contrastive loss naive / chunked / Pallas (memory, compile s, time) up to
#                 B = 32k, and DCNv3 reference / Pallas per InternImage-T stage at batch 32,
#                 fwd and fwd+bwd, with block sweeps ($OUT/kernels_bench.log)
#   navit         NaViT's packed train step with the Pallas flash attention against a plain
#                 padded ViT of the same sequence length, and the attention op masked vs
#                 unmasked ($OUT/navit_bench.log)
#   vit           ViT-B/16 bf16 at batch 256, 224 px: images/s and MFU (analytic FLOPs
#                 against a bf16 matmul measured in the same run) beside timm eager and
#                 torch.compile ($OUT/vit_step.log, .jsonl)
#   internimage   InternImage-T train step at batch 32 with the Pallas DCNv3 against the
#                 reference ($OUT/internimage_step.log, .jsonl)
# Every benchmark prints compile seconds beside its speed. The timeouts (SIGINT, so pytest
# still prints its summary) keep all sections under 8.5 minutes. Needs jax, flax, optax,
# numpy, absl and pytest (torch + timm for the timm columns).
set -uo pipefail
: "${OUT:?set OUT to the folder for the logs}"
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
SECTIONS=("$@")
[ ${#SECTIONS[@]} -eq 0 ] && SECTIONS=(kernel_tests kernels navit vit internimage)
declare -A STATUS

echo "== devices"
nvidia-smi -L || echo "nvidia-smi failed"
"$PYTHON" -c 'import jax; print("jax", jax.__version__, jax.default_backend(), jax.devices())' \
  || echo "jax failed to list devices"

run() {  # run SECTION SECONDS LOG COMMAND...: one section, its output also in $OUT/LOG.
  local section=$1 seconds=$2 log=$3
  shift 3
  echo "== $section"
  timeout -s INT "$seconds" "$@" 2>&1 | tee "$OUT/$log"
  STATUS[$section]=${PIPESTATUS[0]}
}

for section in "${SECTIONS[@]}"; do
  case "$section" in
    kernel_tests) run kernel_tests 100 kernel_tests.log "$PYTHON" -m pytest tests/test_dcnv3.py \
      tests/test_contrastive.py -q -rs -k "not interpret_mode and not reference_matches" \
      --durations=10 ;;
    kernels) run kernels 120 kernels_bench.log "$PYTHON" -u -m benchmarks.kernels \
      --sizes 4096,16384,32768 --time_up_to 16384 --contrastive_block_sweep 32,128 \
      --dcn_batch 32 --dcn_block_sweep 8,32 --repeats 5 ;;
    navit) run navit 70 navit_bench.log "$PYTHON" -u -m benchmarks.navit \
      --attention_impl pallas --width 384 --depth 12 --heads 6 --seq_len 512 --rows 8 \
      --padding 512:64:384 --images 1000 --steps 10 ;;
    vit) run vit 160 vit_step.log "$PYTHON" -u -m benchmarks.model_step --cases vit_b16_bf16 \
      --batch_size 256 --res 224 --steps 10 --matmul_size 8192 --timm_compile \
      --json_out "$OUT/vit_step.jsonl" ;;
    internimage) run internimage 110 internimage_step.log "$PYTHON" -u -m benchmarks.model_step \
      --cases internimage_t_pallas,internimage_t --batch_size 32 --res 224 --steps 5 \
      --json_out "$OUT/internimage_step.jsonl" ;;
    *) echo "unknown section $section (kernel_tests, kernels, navit, vit, internimage)"
       STATUS[$section]=2 ;;
  esac
done

echo "== exit status: $(for s in "${SECTIONS[@]}"; do printf '%s %s, ' "$s" "${STATUS[$s]}"; done)"
for s in "${SECTIONS[@]}"; do [ "${STATUS[$s]}" = 0 ] || exit 1; done
