"""Model FLOPs and device peaks for utilisation (MFU) estimates."""

from __future__ import annotations

from jaxllm.config import ModelConfig

# Dense bf16 peak TFLOP/s per chip, from the vendors' data sheets (no sparsity).
PEAK_TFLOPS = {
    "H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0,
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0,
    "TPU v6 lite": 918.0, "TPU v6e": 918.0,
}


def matmul_params(cfg: ModelConfig) -> int:
  """Parameters that take part in matmuls per token (the LM head included, lookups not)."""
  D, H, K, Dh, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
  per_layer = D * H * Dh * 2 + D * K * Dh * 2 + 3 * D * F
  return cfg.n_layers * per_layer + D * cfg.vocab_size


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """PaLM's estimate, forward + backward: 6 N for the matmuls plus 12 L H Dh T for attention,
  counted at half because the mask is causal (a decoder computes half the score matrix; the
  flash kernels skip the masked blocks). Sliding windows are not discounted further."""
  return 6.0 * matmul_params(cfg) + 6.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


def device_peak_tflops(device_kind: str) -> float | None:
  for name, peak in PEAK_TFLOPS.items():
    if name.lower() in device_kind.lower():
      return peak
  return None
