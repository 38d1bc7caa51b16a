"""Block-size sweep for the GPU flash-attention kernel (run on a GPU: tools/gpu_checks.sh tune).

For each head size, times forward and forward+backward (bf16, causal, B*T = 16k tokens,
H*Dh = 2048) under candidate `BlockSizes`, checks each candidate's output against the default's
(a tile choice must not change the numbers beyond bf16 rounding), and prints TFLOP/s; candidates
that do not compile (shared memory, registers) are listed with the reason. The defaults in
`BlockSizes.default` come from this table.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from jaxllm.bench.timing import median_seconds
from pallas_kernels.flash_attention.common import BlockSizes

CANDIDATES = {
    64: [BlockSizes(128, 64, None, None, 4, 3), BlockSizes(128, 128, None, None, 8, 3),
         BlockSizes(128, 64, 64, 64, 4, 3), BlockSizes(64, 64, None, None, 4, 3),
         BlockSizes(128, 64, 64, 128, 8, 2), BlockSizes(128, 128, 64, 128, 8, 2)],
    128: [BlockSizes(128, 64, 64, 64, 8, 3), BlockSizes(128, 64, 64, 64, 8, 2),
          BlockSizes(128, 64, 32, 64, 4, 3), BlockSizes(128, 128, 64, 64, 8, 2),
          BlockSizes(64, 64, 64, 64, 4, 3), BlockSizes(128, 32, 64, 32, 4, 3),
          BlockSizes(128, 64, 64, 128, 8, 2)],
}


def main(seq_len: int = 4096):
  rows = []
  for Dh, candidates in CANDIDATES.items():
    B, H = 16384 // seq_len, 2048 // Dh
    rng = np.random.default_rng(0)
    q, k, v, do = (jnp.asarray(rng.standard_normal((B, seq_len, H, Dh)), jnp.bfloat16)
                   for _ in range(4))
    flops = 4.0 * B * H * seq_len * seq_len * Dh * 0.5
    reference = None
    for bs in candidates:
      attn = lambda q, k, v, bs=bs: pk.flash_attention(q, k, v, causal=True, block_sizes=bs)

      def fwd_bwd(q, k, v, do, attn=attn):
        out, vjp = jax.vjp(attn, q, k, v)
        return (out, *vjp(do))
      try:
        outs = jax.jit(fwd_bwd)(q, k, v, do)
        outs = [np.asarray(o, np.float32) for o in outs]
        if reference is None:
          reference = outs
        err = max(float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))
                  for a, b in zip(outs, reference))
        fwd = flops / median_seconds(jax.jit(attn), (q, k, v), 10) / 1e12
        both = 3.5 * flops / median_seconds(jax.jit(fwd_bwd), (q, k, v, do), 10) / 1e12
        rows.append((Dh, bs, f"{fwd:7.1f}", f"{both:7.1f}", f"{err:.1e}"))
      except Exception as e:  # noqa: BLE001 - report and go on to the next candidate
        rows.append((Dh, bs, "-", "-", f"{type(e).__name__}: {str(e)[:90]}"))
      print(*rows[-1], flush=True)
  print(f"\nT={seq_len} causal bf16 on {jax.devices()[0].device_kind}, jax {jax.__version__}")
  print("Dh | block_q block_k block_q_bwd block_k_bwd warps stages | fwd TFLOP/s | "
        "fwd+bwd TFLOP/s | max rel diff vs first")
  for Dh, bs, fwd, both, err in rows:
    print(f"{Dh} | {bs.block_q} {bs.block_k} {bs.bwd[0]} {bs.bwd[1]} {bs.num_warps} "
          f"{bs.num_stages} | {fwd} | {both} | {err}")


if __name__ == "__main__":
  main(int(sys.argv[1]) if len(sys.argv) > 1 else 4096)
