"""The CPU kernel library's decode attention (`jaxllm.ops.cpu_attention`) against XLA's
`jaxllm.ops.attention.attention` on the same layer of a stacked cache: grouped heads, ragged
lengths, a sliding window, a query that sees no key, and which calls take it. Its paged form
against XLA's `paged_attention` (which gathers the pages first): float32 and int8 pages, pages
out of order, a page two sequences share, pages of whole and partial 16-position blocks."""

import chex
import numpy as np
import pytest

import jax.numpy as jnp

from jaxllm.model import cache as kv_cache
from jaxllm.ops import attention as attention_ops
from jaxllm.ops import cpu_attention, cpu_gemv

needs_kernel = pytest.mark.skipif(not cpu_gemv.available(), reason="no C++ compiler")


def _case(B=2, T=3, H=6, K=2, S=37, Dh=40, L=3, seed=0):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((B, T, H, Dh)), jnp.float32)
  cache_k, cache_v = (jnp.asarray(rng.standard_normal((L, B, S, K, Dh)), jnp.float32)
                      for _ in range(2))
  # Sequence 0 is at position 20 (keys beyond it are stale slots), sequence 1 at 33; query
  # index -1 sees no key (XLA's softmax then averages all of them, and so must the kernel).
  q_index = jnp.asarray([[20, 21, 22], [33, -1, 34]], jnp.int32)[:B, :T]
  kv_index = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
  return q, cache_k, cache_v, q_index, kv_index


@needs_kernel
class DecodeAttentionTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_equals_xla_attention_on_the_layer(self):
    # Head sizes of whole 16-float vectors take the kernel's blocks of 16 positions (here
    # whole blocks nobody sees, a window that hides a block, a ragged last block), others and
    # each shape's tail positions one at a time; 8 query heads per kv head of 48 floats are
    # more accumulators than the blocked value pass holds.
    for shape in (dict(), dict(S=53, Dh=32), dict(H=8, K=1, S=40, Dh=48)):
      self._check(*_case(**shape))

  def _check(self, q, cache_k, cache_v, q_index, kv_index):
    for layer in (0, 2):
      for window in (None, 5):
        got = self.variant(lambda q, k, v, layer: cpu_attention.attention(
            q, k, v, layer, q_index_BT=q_index, kv_index_BS=kv_index,
            sliding_window=window))(q, cache_k, cache_v, layer)
        want = attention_ops.attention(q, cache_k[layer], cache_v[layer], q_index=q_index,
                                       kv_index=kv_index, sliding_window=window)
        chex.assert_shape(got, q.shape)
        chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)


def test_applies_only_to_float32_short_steps_without_alibi_or_soft_cap():
  q, cache_k, _, _, _ = _case(T=cpu_attention.MAX_QUERIES)
  with cpu_gemv.cpu_kernel("always"):
    assert cpu_attention.applies(q, cache_k) == cpu_gemv.available()
    assert not cpu_attention.applies(q.astype(jnp.bfloat16), cache_k.astype(jnp.bfloat16))
    assert not cpu_attention.applies(q, cache_k, alibi_slopes=jnp.ones((6,)))
    assert not cpu_attention.applies(q, cache_k, logit_soft_cap=30.0)
    long_q = jnp.zeros((1, cpu_attention.MAX_QUERIES + 1, 6, 40), jnp.float32)
    assert not cpu_attention.applies(long_q, cache_k)
  with cpu_gemv.cpu_kernel("never"):
    assert not cpu_attention.applies(q, cache_k)


def _paged_case(P, Dh, int8, B=3, T=2, H=6, K=2, M=5, N=19, L=2, seed=1):
  """Pools `[L, N, P, K, Dh]` and a page table whose pages are out of order, with sequences 0
  and 1 sharing their first page (a prefix-cache hit) and sequence 2 in a page of its own."""
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((B, T, H, Dh)), jnp.float32)
  pools = [rng.standard_normal((L, N, P, K, Dh)).astype(np.float32) for _ in range(2)]
  if int8:
    pools = [kv_cache.Int8KV(*kv_cache.quantize_kv(jnp.asarray(x))) for x in pools]
  else:
    pools = [jnp.asarray(x) for x in pools]
  pages = rng.permutation(N)[:B * M].reshape(B, M)
  pages[1, 0] = pages[0, 0]
  table = jnp.asarray(pages, jnp.int32)
  # Tokens already cached: sequence 0 ends inside its first page, 1 a few pages on, 2 near the
  # end of its table (the step's T tokens fit).
  lengths = jnp.asarray([P // 2, 2 * P + 3, M * P - T], jnp.int32)[:B]
  return q, pools, table, lengths


@needs_kernel
class PagedDecodeAttentionTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_equals_xla_paged_attention_on_the_layer(self):
    # Pages of 16 positions take the blocks of 16 (each inside one page); pages of 5 and a
    # head size of 40 the position-at-a-time loops.
    for P, Dh in ((16, 32), (5, 40), (16, 40)):
      for int8 in (False, True):
        q, (k, v), table, lengths = _paged_case(P, Dh, int8)
        T = q.shape[1]
        q_index = lengths[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
        for layer in (0, 1):
          for window in (None, 7):
            scales = {}
            if int8:
              scales = dict(k_scales_LNPK=k.scales, v_scales_LNPK=v.scales)
            got = self.variant(lambda q, table, layer: cpu_attention.paged_attention(
                q, k.values if int8 else k, v.values if int8 else v, layer, table,
                q_index_BT=q_index, sliding_window=window, **scales))(q, table, layer)
            ref_scales = {}
            if int8:
              ref_scales = dict(k_scales=k.scales[layer], v_scales=v.scales[layer])
            want = attention_ops.paged_attention(
                q, (k.values if int8 else k)[layer], (v.values if int8 else v)[layer],
                lengths + T, table, sliding_window=window, impl="xla", **ref_scales)
            chex.assert_shape(got, q.shape)
            chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)

  def test_takes_only_float32_or_int8_pools_and_short_steps(self):
    q, (k, _), _, _ = _paged_case(16, 32, False)
    with cpu_gemv.cpu_kernel("always"):
      assert cpu_attention.paged_applies(q, k)
      assert cpu_attention.paged_applies(q, k.astype(jnp.int8))
      assert not cpu_attention.paged_applies(q, k.astype(jnp.bfloat16))
      assert not cpu_attention.paged_applies(q, k, alibi_slopes=jnp.ones((6,)))
      assert not cpu_attention.paged_applies(q, k, logit_soft_cap=30.0)
      long_q = jnp.zeros((1, cpu_attention.MAX_QUERIES + 1, 6, 32), jnp.float32)
      assert not cpu_attention.paged_applies(long_q, k)
    with cpu_gemv.cpu_kernel("never"):
      assert not cpu_attention.paged_applies(q, k)


@needs_kernel
@pytest.mark.parametrize("cache_dtype", ["float32", "int8"])
def test_engine_outputs_unchanged_when_the_kernel_reads_its_pages(cache_dtype):
  """The engine serving the same traffic with its decode steps' attention in the kernel
  (mode "always") and in XLA's gather of pages ("never"): the same tokens for every request,
  greedy and sampled, with requests sharing prompt pages through the prefix cache. Pages of
  16 positions and heads of 16 floats take the kernel's blocked loops."""
  import jax
  from jaxllm.inference import engine as engine_lib
  from jaxllm.inference import sampling, steps
  from jaxllm.model import transformer
  from tests.helpers import tiny_model
  cfg = tiny_model(n_layers=2, head_dim=16, init_std=0.4)
  graphdef, params = transformer.split(transformer.create(cfg, 5))
  rng = np.random.default_rng(0)
  system = rng.integers(0, 64, 20).tolist()  # a full shared page, then some
  work = [(system + rng.integers(0, 64, int(rng.integers(1, 30))).tolist(),
           sampling.SamplingParams(max_tokens=int(rng.integers(8, 40)), seed=i,
                                   temperature=0.0 if i % 2 else 1.0)) for i in range(10)]
  outputs, lowered = {}, {}
  for mode in ("always", "never"):
    jax.clear_caches()  # the mode is read while tracing: trace the steps anew
    with cpu_gemv.cpu_kernel(mode):
      engine = engine_lib.Engine(graphdef, params, engine_lib.EngineConfig(
          max_slots=4, num_pages=40, page_size=16, prefill_chunk=16, cache_dtype=cache_dtype))
      requests = engine_lib.generate_all(engine, *zip(*work))
      outputs[mode] = [r.tokens for r in requests]
      assert engine.stats["prefix_hit_tokens"] > 0
      batch = engine.runner.batch(np.zeros((4, 2), np.int32), np.full(4, 3, np.int32),
                                  np.ones(4, bool), np.zeros(4, np.int32), None, None)
      lowered[mode] = steps.decode.lower(graphdef, params, engine.runner.state, batch,
                                         penalties=False).as_text()
  jax.clear_caches()
  assert cpu_gemv.PAGED_ATTENTION_TARGET in lowered["always"]
  assert cpu_gemv.PAGED_ATTENTION_TARGET not in lowered["never"]
  assert outputs["always"] == outputs["never"]
