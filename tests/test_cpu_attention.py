"""The CPU kernel library's decode attention (`jaxllm.ops.cpu_attention`) against XLA's
`jaxllm.ops.attention.attention` on the same layer of a stacked cache: grouped heads, ragged
lengths, a sliding window, a query that sees no key, and which calls take it."""

import chex
import numpy as np
import pytest

import jax.numpy as jnp

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
