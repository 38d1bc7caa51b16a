"""One engine decode step (paged pools) against the same model's step on a contiguous cache,
SmolLM2-135M fp32, batch 8, with the CPU kernel library's attention ("auto") and without it
("never": at batch 8 the float32 products are XLA's either way, so only attention changes).

  python tools/results/serve-throughput-2026-12-07/decode_step_micro.py [LENGTH] [PAGES]

LENGTH tokens already cached per row (default 256), PAGES the page table's width (default 32
pages of 16: 512 positions, the engine's table for sequences of 257-512 tokens); median of 60
interleaved calls each.
"""
import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxllm
from jaxllm.fetch import fetch
from jaxllm.inference import engine as engine_lib, runner as runner_lib, sampling
from jaxllm.model import cache as kv_cache
from jaxllm.ops import cpu_gemv

model = jaxllm.load(fetch("smollm2-135m"))
B, P = 8, 16
length = int(sys.argv[1]) if len(sys.argv) > 1 else 256
W = int(sys.argv[2]) if len(sys.argv) > 2 else 32
mc = model.config


def median_ms(fs, n=60):
  for f in fs:
    f(); f()
  times = [[] for _ in fs]
  for _ in range(n):
    for j, f in enumerate(fs):
      t = time.perf_counter(); f(); times[j].append(time.perf_counter() - t)
  return [float(np.median(x)) * 1e3 for x in times]


for mode in ("auto", "never"):
  jax.clear_caches()
  with cpu_gemv.cpu_kernel(mode):
    cfg = engine_lib.EngineConfig(max_slots=B, page_size=P, max_seq_len=1024, num_pages=B * 64)
    r = runner_lib.Runner(model.graphdef, model.params, cfg, max_seq_len=1024)
    r.refresh_sampling([sampling.SamplingParams()] * B)
    table = np.arange(B * W, dtype=np.int32).reshape(B, W)
    lengths = np.full(B, length, np.int32)

    def paged():
      tok, _ = r.decode(r.batch(table, lengths, np.ones(B, bool), np.zeros(B, np.int32), None,
                                None))
      jax.block_until_ready(tok)

    shape = (mc.n_layers, B, W * P, mc.n_kv_heads, mc.head_dim)
    state = [kv_cache.KVCache(jnp.zeros(shape), jnp.zeros(shape), jnp.full((B,), length,
                                                                            jnp.int32))]

    @functools.partial(jax.jit, donate_argnums=1)
    def step(params, cache):
      logits, cache = nnx.merge(model.graphdef, params).extend(
          jnp.zeros((B, 1), jnp.int32), cache, jnp.ones((B,), jnp.int32))
      return jnp.argmax(logits[:, 0], -1), cache._replace(lengths=cache.lengths - 1)

    def contiguous():
      tok, state[0] = step(model.params, state[0])
      jax.block_until_ready(tok)

    p, c = median_ms([paged, contiguous])
    print(f"kernel {mode}: B={B}, {length} tokens cached, table of {W} pages of {P}: "
          f"engine decode step (paged) {p:.1f} ms, contiguous cache {c:.1f} ms")
