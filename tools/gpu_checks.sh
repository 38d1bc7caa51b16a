#!/usr/bin/env bash
# The checks and benchmarks that need a GPU, in one call (the figures in BUILD.md came from it).
# Usage: tools/gpu_checks.sh OUTDIR [kernels] [attention] [tune] [quant] [moe] [long_context]
# Runs from the repo root with the machine's own jax (0.11.x + CUDA plugin); no install.
set -uo pipefail
out=${1:?output directory}; shift
mkdir -p "$out"
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$out/gpu.txt"
for part in "$@"; do
  case $part in
    kernels)  # flash (fwd+bwd) and paged attention compiled through Triton, against the reference
      python3 -m pytest -q -p no:cacheprovider tests/test_flash_attention.py \
        tests/test_paged_attention.py -k "not tpu" 2>&1 | tee "$out/kernels.log" | tail -25 ;;
    attention)
      timeout 420 python3 -m jaxllm.bench attention --out="$out/attention.json" \
        2>&1 | tee "$out/attention.log" | tail -45 ;;
    tune)  # block sizes of the flash kernel
      PYTHONPATH=.:${PYTHONPATH:-} timeout 400 python3 tools/tune_flash.py 4096 2>&1 | tee "$out/tune.log" | tail -20 ;;
    quant)
      python3 -m pytest -q -p no:cacheprovider tests/test_quant_kernel.py 2>&1 \
        | tee "$out/quant_tests.log" | tail -15
      timeout 300 python3 -m jaxllm.bench quant_matmul --out="$out/quant.json" \
        2>&1 | tee "$out/quant.log" | tail -30 ;;
    moe)  # grouped-matmul kernel + MoE layer compiled on the GPU; tile sweep; bench moe
      python3 -m pytest -q -p no:cacheprovider tests/test_grouped_matmul.py tests/test_moe.py \
        -k "not gptq and not awq and not speculative" 2>&1 | tee "$out/moe_tests.log" | tail -15
      PYTHONPATH=.:${PYTHONPATH:-} timeout 240 python3 tools/tune_gmm.py 2>&1 \
        | tee "$out/tune_gmm.log" | tail -12
      timeout 300 python3 -m jaxllm.bench moe --out="$out/moe.json" \
        2>&1 | tee "$out/moe.log" | tail -25 ;;
    long_context)  # cuDNN with ALiBi; ALiBi and the lse output through the compiled kernels
      python3 -m pytest -q -p no:cacheprovider tests/test_attention_ops.py \
        tests/test_flash_attention.py -k "cudnn or alibi or log_sum_exp" 2>&1 \
        | tee "$out/long_context.log" | tail -15 ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
done
