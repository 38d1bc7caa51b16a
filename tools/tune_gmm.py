"""Block-size sweep for the GPU grouped-matmul kernel (run on a GPU: tools/gpu_checks.sh moe).

Times the forward and the forward+backward (bf16) at a Mixtral-sized expert projection
(16384 token-slots, 4096 -> 14336, 8 experts of balanced random sizes) under candidate
`BlockSizes`, checks each candidate's output against `jax.lax.ragged_dot`, and prints TFLOP/s
beside ragged_dot's; candidates that do not compile are listed with the reason. The defaults in
`pallas_kernels.grouped_matmul.BlockSizes` come from this table.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from jaxllm.bench.timing import median_seconds
from pallas_kernels.grouped_matmul import BlockSizes

CANDIDATES = [BlockSizes(64, 128, 64, 4, 3), BlockSizes(128, 128, 64, 8, 3),
              BlockSizes(128, 128, 32, 4, 4), BlockSizes(128, 256, 64, 8, 3),
              BlockSizes(64, 64, 64, 4, 4), BlockSizes(128, 64, 64, 4, 3),
              BlockSizes(256, 128, 64, 8, 3)]


def main(M=16384, K=4096, N=14336, E=8):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((E, K, N)) * 0.02, jnp.bfloat16)
  dy = jnp.asarray(rng.standard_normal((M, N)), jnp.bfloat16)
  split = np.sort(rng.choice(np.arange(1, M), E - 1, replace=False))
  sizes = jnp.asarray(np.diff(np.concatenate([[0], split, [M]])), jnp.int32)
  flops = 2.0 * M * K * N
  cpu = jax.default_backend() == "cpu"  # interpreted: checks the script, not the speed
  want = jax.jit(jax.lax.ragged_dot)(x, w, sizes).astype(jnp.float32)
  scale = float(jnp.abs(want).max())

  def fwd_bwd(f):
    def run(x, w, g, dy):
      _, vjp = jax.vjp(lambda x, w: f(x, w, g), x, w)
      return vjp(dy)
    return jax.jit(run)

  ragged = jax.lax.ragged_dot
  print(f"grouped matmul M={M} K={K} N={N} E={E} bf16, {jax.devices()[0].device_kind}")
  print(f"ragged_dot: fwd {flops / median_seconds(jax.jit(ragged), (x, w, sizes), 10) / 1e12:.1f}"
        f" TFLOP/s, fwd+bwd "
        f"{3 * flops / median_seconds(fwd_bwd(ragged), (x, w, sizes, dy), 5) / 1e12:.1f}")
  for bs in CANDIDATES:
    f = lambda x, w, g, bs=bs: pk.grouped_matmul(x, w, g, block_sizes=bs, interpret=cpu)
    try:
      got = jax.jit(f)(x, w, sizes).astype(jnp.float32)
      err = float(jnp.abs(got - want).max()) / scale
      t_fwd = median_seconds(jax.jit(f), (x, w, sizes), 10)
      t_all = median_seconds(fwd_bwd(f), (x, w, sizes, dy), 5)
      print(f"{bs}: fwd {flops / t_fwd / 1e12:.1f} TFLOP/s, fwd+bwd {3 * flops / t_all / 1e12:.1f}"
            f", max rel err {err:.1e}")
    except Exception as e:  # noqa: BLE001 - a tile that does not fit is a result, not a failure
      print(f"{bs}: failed: {type(e).__name__}: {str(e)[:160]}")


if __name__ == "__main__":
  import sys
  main(*(int(a) for a in sys.argv[1:5]))  # M K N E (the default: the Mixtral shape above)
