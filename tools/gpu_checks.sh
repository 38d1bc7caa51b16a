#!/usr/bin/env bash
# The checks and benchmarks that need a GPU, in one call (the figures in docs/gpu.md and docs/kernels.md came from it).
# Usage: tools/gpu_checks.sh OUTDIR PART...
#   kernels       flash (fwd+bwd; Triton, and the Mosaic GPU forward) and paged attention
#                 compiled, against the reference
#   attention     our flash attention (Triton; Mosaic GPU forward) against cuDNN, XLA and JAX's
#                 bundled Pallas kernels (Triton and Mosaic GPU) at 4k and 8k tokens, head_dim
#                 64 and 128, causal and not
#   tune          block sizes of the flash kernel at 4k
#   quant         the int4 kernel's tests and bench quant_matmul
#   moe           grouped-matmul kernel + MoE layer compiled; tile sweep; bench moe
#   long_context  cuDNN with ALiBi; ALiBi and the lse output through the compiled kernels
#   decode        batch-1 decoding, bf16 and bf16+int4, SmolLM2-135M and a random ~1B Llama,
#                 against the bandwidth bound (bytes per token / measured copy bandwidth)
#   train         the ~1B Llama's train step (experiments/llama_1b.py): MFU per remat/attention
#   serve         bench serve on SmolLM2: throughput, TTFT, host/device overlap on vs off
# Runs from the repo root with the machine's own jax (0.11.x + CUDA plugin); no install.
# Device time comes in ~15-minute windows: each part has its own timeout, and a window holds
# about `kernels attention` or `decode train serve` (measured times in docs/gpu.md).
# GPU_CHECKS_CPU=1 runs every part on this machine's CPU at toy sizes (the script's own test).
set -uo pipefail
out=${1:?output directory}; shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH=.:${PYTHONPATH:-}
llama_1b=experiments/llama_1b.py
if [[ ${GPU_CHECKS_CPU:-0} == 1 ]]; then
  export JAX_PLATFORMS=cpu
  toy=(--config.model.d_model=64 --config.model.n_layers=2 --config.model.n_heads=4
       --config.model.n_kv_heads=2 --config.model.head_dim=16 --config.model.d_ff=128)
  attention_sizes=(--seq_lens=256 --head_dims=64 --tokens=512 --width=128 --causal=true
                   --repeats=1)
  decode_sizes=(--new_tokens=4 --prompt_tokens=8 --repeats=1)
  train_runs=("--config=$llama_1b ${toy[*]} --config.model.vocab_size=256
               --config.train.seq_len=64 --config.train.batch_size=2 --steps=2")
  serve_sizes=(--requests=4 --max_output_tokens=16 --prefix_requests=2 --rate=50)
  echo "GPU_CHECKS_CPU=1: toy sizes on the CPU (a test of this script, not a measurement)" \
    | tee "$out/gpu.txt"
else
  export JAX_PLATFORMS=cuda
  toy=()
  attention_sizes=(--seq_lens=4096,8192 --head_dims=64,128 --causal=true,false --repeats=5)
  decode_sizes=(--new_tokens=256 --prompt_tokens=64 --repeats=3)
  # Batch 8 x 4096 tokens each: no remat (fits an H200), cuDNN's attention instead of ours,
  # and the dots_no_batch policy.
  train_runs=("--config=$llama_1b --steps=5"
              "--config=$llama_1b --steps=5 --config.model.attention_impl=cudnn"
              "--config=$llama_1b --steps=5 --config.model.remat=dots_no_batch")
  serve_sizes=(--requests=64)
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv \
    | tee "$out/gpu.txt"
fi
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$out/gpu.txt"
for part in "$@"; do
  start=$SECONDS
  case $part in
    kernels)
      python3 -m pytest -q -p no:cacheprovider tests/test_flash_attention.py \
        tests/test_flash_attention_mgpu.py tests/test_paged_attention.py -k "not tpu" 2>&1 \
        | tee "$out/kernels.log" | tail -25 ;;
    attention)
      timeout 420 python3 -m jaxllm.bench attention "${attention_sizes[@]}" \
        --out="$out/attention.json" 2>&1 | tee "$out/attention.log" | tail -25 ;;
    tune)
      timeout 400 python3 tools/tune_flash.py 4096 2>&1 | tee "$out/tune.log" | tail -20 ;;
    quant)
      python3 -m pytest -q -p no:cacheprovider tests/test_quant_kernel.py 2>&1 \
        | tee "$out/quant_tests.log" | tail -15
      timeout 300 python3 -m jaxllm.bench quant_matmul --out="$out/quant.json" \
        2>&1 | tee "$out/quant.log" | tail -30 ;;
    moe)
      python3 -m pytest -q -p no:cacheprovider tests/test_grouped_matmul.py tests/test_moe.py \
        -k "not gptq and not awq and not speculative" 2>&1 | tee "$out/moe_tests.log" | tail -15
      timeout 240 python3 tools/tune_gmm.py 2>&1 | tee "$out/tune_gmm.log" | tail -12
      timeout 300 python3 -m jaxllm.bench moe --out="$out/moe.json" \
        2>&1 | tee "$out/moe.log" | tail -25 ;;
    long_context)
      python3 -m pytest -q -p no:cacheprovider tests/test_attention_ops.py \
        tests/test_flash_attention.py -k "cudnn or alibi or log_sum_exp" 2>&1 \
        | tee "$out/long_context.log" | tail -15 ;;
    decode)  # fp32 beside bf16 on SmolLM2 only: the 1B's float32 copy is not the target
      timeout 200 python3 -m jaxllm.bench decode --batches=1 --drafts= "${decode_sizes[@]}" \
        --decode_peers=jaxllm_fp32,jaxllm_bf16,jaxllm_bf16_int4 \
        --out="$out/decode_smollm2.json" 2>&1 | tee "$out/decode_smollm2.log" | tail -12
      timeout 240 python3 -m jaxllm.bench decode --random_init --config=$llama_1b "${toy[@]}" \
        --batches=1 --drafts= "${decode_sizes[@]}" --decode_peers=jaxllm_bf16,jaxllm_bf16_int4 \
        --out="$out/decode_llama_1b.json" 2>&1 | tee "$out/decode_llama_1b.log" | tail -12 ;;
    train)
      i=0
      for run in "${train_runs[@]}"; do
        i=$((i + 1))
        # shellcheck disable=SC2086  # each run is a list of flags
        timeout 180 python3 -m jaxllm.bench train $run --out="$out/train_$i.json" 2>&1 \
          | tee "$out/train_$i.log" | tail -12
      done ;;
    serve)
      timeout 300 python3 -m jaxllm.bench serve "${serve_sizes[@]}" --out="$out/serve.json" \
        2>&1 | tee "$out/serve.log" | tail -20 ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
  echo "== $part: $((SECONDS - start)) s" | tee -a "$out/times.txt"
done
