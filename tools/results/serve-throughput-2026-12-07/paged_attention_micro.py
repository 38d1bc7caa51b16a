"""The kernel library's paged decode attention against XLA's (gather the pages, then attend)
on one layer of SmolLM2-135M's shapes: q [8, 1, 9, 64], pools [3, 64, 16, 3, 64] float32 or
int8, a table of 32 pages per row (out of order), lengths drawn in [1, 510]; microseconds per
call (jitted, mean of 50), and the largest difference.

  python tools/results/serve-throughput-2026-12-07/paged_attention_micro.py
"""
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.model import cache as kv_cache
from jaxllm.ops import attention as attn
from jaxllm.ops import cpu_attention, cpu_gemv

assert cpu_gemv.available()
rng = np.random.default_rng(0)
L, N, P, K, Dh, H, B, T, M = 3, 64, 16, 3, 64, 9, 8, 1, 32
layer = 1
for dtype in ("float32", "int8"):
  kf = jnp.asarray(rng.standard_normal((L, N, P, K, Dh)), jnp.float32)
  vf = jnp.asarray(rng.standard_normal((L, N, P, K, Dh)), jnp.float32)
  table = jnp.asarray(rng.permutation(N * 4)[:B * M].reshape(B, M) % N, jnp.int32)
  lengths = jnp.asarray(rng.integers(1, M * P - T, B), jnp.int32)
  q = jnp.asarray(rng.standard_normal((B, T, H, Dh)), jnp.float32)
  if dtype == "int8":
    (kv, ks), (vv, vs) = kv_cache.quantize_kv(kf), kv_cache.quantize_kv(vf)
    ref_scales = dict(k_scales=ks[layer], v_scales=vs[layer])
    scales = dict(k_scales_LNPK=ks, v_scales_LNPK=vs)
  else:
    kv, vv, ref_scales, scales = kf, vf, {}, {}
  q_index = lengths[:, None] + jnp.arange(T)[None]
  for window in (None, 40):
    xla = jax.jit(lambda q: attn.paged_attention(q, kv[layer], vv[layer], lengths + T, table,
                                                 sliding_window=window, impl="xla",
                                                 **ref_scales))
    kernel = jax.jit(lambda q: cpu_attention.paged_attention(
        q, kv, vv, layer, table, q_index_BT=q_index, sliding_window=window, **scales))
    err = float(jnp.max(jnp.abs(xla(q) - kernel(q))))

    def us(f, n=50):
      f(q).block_until_ready()
      start = time.perf_counter()
      for _ in range(n):
        f(q).block_until_ready()
      return (time.perf_counter() - start) / n * 1e6

    print(f"{dtype} pages, window {window}: XLA {us(xla):.0f} us, kernel {us(kernel):.0f} us, "
          f"largest difference {err:.1e}")
