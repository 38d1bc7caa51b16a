"""ops.attention against a loop-based numpy reference (repeated K/V, explicit masks)."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxllm.model.positions import alibi_slopes
from jaxllm.ops.attention import (attention, dot_product_attention, paged_attention, resolve_impl,
                                  self_attention)


def reference(q, k, v, q_index, kv_index, q_seg=None, kv_seg=None, window=None, slopes=None):
  B, T, H, Dh = q.shape
  K = k.shape[2]
  out = np.zeros((B, T, H, Dh), np.float64)
  for b in range(B):
    for h in range(H):
      kh = h // (H // K)
      for t in range(T):
        visible = kv_index[b] <= q_index[b, t]
        if window is not None:
          visible &= kv_index[b] > q_index[b, t] - window
        if q_seg is not None:
          visible &= kv_seg[b] == q_seg[b, t]
        if not visible.any():
          visible = np.ones_like(visible)  # our convention: fully masked rows average everything
        s = (k[b, :, kh].astype(np.float64) @ q[b, t, h].astype(np.float64)) / np.sqrt(Dh)
        if slopes is not None:
          s -= slopes[h] * np.abs(q_index[b, t] - kv_index[b])
        s = np.where(visible, s, -np.inf)
        p = np.exp(s - s.max())
        p /= p.sum()
        out[b, t, h] = p @ v[b, :, kh]
  return out


@pytest.mark.parametrize("H, K", [(4, 4), (6, 2), (8, 1)])
def test_matches_reference_gqa(H, K):
  rng = np.random.default_rng(0)
  B, T, Dh = 2, 7, 16
  q = rng.normal(size=(B, T, H, Dh)).astype(np.float32)
  k = rng.normal(size=(B, T, K, Dh)).astype(np.float32)
  v = rng.normal(size=(B, T, K, Dh)).astype(np.float32)
  idx = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
  got = jax.jit(lambda *a: attention(*a, q_index=idx, kv_index=idx))(q, k, v)
  np.testing.assert_allclose(got, reference(q, k, v, idx, idx), atol=1e-5)


def test_segments_and_offsets():
  rng = np.random.default_rng(1)
  B, T, S, H, K, Dh = 2, 3, 9, 4, 2, 8
  q = rng.normal(size=(B, T, H, Dh)).astype(np.float32)
  k = rng.normal(size=(B, S, K, Dh)).astype(np.float32)
  v = rng.normal(size=(B, S, K, Dh)).astype(np.float32)
  q_index = np.array([[4, 5, 6], [6, 7, 8]], np.int32)  # queries at the end of a cache
  kv_index = np.broadcast_to(np.arange(S, dtype=np.int32), (B, S))
  q_seg = np.array([[1, 2, 2], [1, 1, 1]], np.int32)
  kv_seg = np.array([[1, 1, 1, 2, 2, 2, 2, 0, 0], [1] * 9], np.int32)
  got = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), q_index=q_index,
                  kv_index=kv_index, q_segment_ids=q_seg, kv_segment_ids=kv_seg)
  np.testing.assert_allclose(got, reference(q, k, v, q_index, kv_index, q_seg, kv_seg), atol=1e-5)


@pytest.mark.parametrize("window", [1, 3, 6])
def test_sliding_window(window):
  rng = np.random.default_rng(2)
  B, T, H, K, Dh = 2, 9, 4, 2, 8
  q = rng.normal(size=(B, T, H, Dh)).astype(np.float32)
  k = rng.normal(size=(B, T, K, Dh)).astype(np.float32)
  v = rng.normal(size=(B, T, K, Dh)).astype(np.float32)
  idx = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
  got = attention(q, k, v, q_index=idx, kv_index=idx, sliding_window=window)
  np.testing.assert_allclose(got, reference(q, k, v, idx, idx, window=window), atol=1e-5)
  if window == 1:  # each query sees only itself: the output is its own value
    np.testing.assert_allclose(got, np.repeat(v, H // K, axis=2), atol=1e-6)


def test_rejects_bad_shapes():
  q = jnp.zeros((1, 2, 3, 8))
  kv = jnp.zeros((1, 2, 2, 8))
  idx = jnp.zeros((1, 2), jnp.int32)
  with pytest.raises(ValueError, match="multiple of kv heads"):
    attention(q, kv, kv, q_index=idx, kv_index=idx)


def _packed(seed, B=2, T=40, H=4, K=2, Dh=64):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(B, T, H, Dh)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(B, T, K, Dh)), jnp.float32) for _ in range(2))
  seg = np.ones((B, T), np.int32)
  seg[:, 15:] = 2
  seg[1, 33:] = 0  # trailing padding, as the packer writes it
  return q, k, v, jnp.asarray(seg)


@pytest.mark.parametrize("window", [None, 6])
def test_self_attention_pallas_matches_xla(window):
  q, k, v, seg = _packed(0)
  want = self_attention(q, k, v, segment_ids=seg, sliding_window=window, impl="xla")
  got = self_attention(q, k, v, segment_ids=seg, sliding_window=window, impl="pallas")
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


@pytest.mark.parametrize("window", [None, 6])
def test_cudnn_path_masking_conventions_match_xla(window):
  """The cudnn route's mask translation, run through jax.nn's XLA implementation on CPU."""
  q, k, v, seg = _packed(1)
  want = self_attention(q, k, v, segment_ids=seg, sliding_window=window, impl="xla")
  got = dot_product_attention(q, k, v, seg, window, None, None, implementation="xla")
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="cuDNN itself needs a GPU (tools/gpu_checks.sh long_context runs it)")
def test_cudnn_runs_alibi_and_segments_on_a_gpu():
  """The cudnn impl on the GPU (bf16, its fused kernel's type) with ALiBi's additive bias and
  packed segments, against the float32 XLA path on the same inputs."""
  H, K = 4, 2
  q, k, v, seg = (x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x
                  for x in _packed(4, H=H, K=K))
  slopes = jnp.asarray(alibi_slopes(H)) * 4
  up = lambda x: x.astype(jnp.float32)
  want = self_attention(up(q), up(k), up(v), segment_ids=seg, impl="xla", alibi_slopes=slopes)
  got = self_attention(q, k, v, segment_ids=seg, impl="cudnn", alibi_slopes=slopes)
  np.testing.assert_allclose(np.asarray(up(got)), np.asarray(want), atol=3e-2)


def test_auto_picks_pallas_only_where_it_runs_natively():
  assert resolve_impl("auto", 64, "gpu") == "pallas"
  assert resolve_impl("auto", 64, "tpu") == "pallas"
  assert resolve_impl("auto", 64, "cpu") == "xla"
  assert resolve_impl("auto", 8, "gpu") == "xla"  # head size the kernel does not take
  assert resolve_impl("cudnn", 64, "gpu") == "cudnn"
  with pytest.raises(ValueError, match="unknown attention impl"):
    resolve_impl("flash", 64)


def test_pallas_runs_per_shard_under_a_mesh():
  from jaxllm.config import MeshConfig
  from jaxllm.parallel import mesh as mesh_lib
  q, k, v, seg = _packed(2, B=4)
  want = self_attention(q, k, v, segment_ids=seg, impl="xla")
  mesh = mesh_lib.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  f = jax.jit(lambda q, k, v, seg: self_attention(q, k, v, segment_ids=seg, impl="pallas"))
  with jax.set_mesh(mesh):
    got = f(q, k, v, seg)
    text = f.lower(q, k, v, seg).as_text()
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
  assert "manual" in text  # shard_map: each device runs the kernel on its own shard


def test_alibi_slopes_follow_the_paper():
  np.testing.assert_allclose(alibi_slopes(8), [2.0 ** -i for i in range(1, 9)])
  # 6 heads: the 4-head slopes, then every other slope of 8 heads (the paper's rule)
  np.testing.assert_allclose(alibi_slopes(6), [2.0 ** -i for i in (2, 4, 6, 8, 1, 3)])
  np.testing.assert_allclose(alibi_slopes(1), [2.0 ** -8])


def test_alibi_in_every_path_matches_the_reference():
  """Full forward (XLA, our flash kernel, the cuDNN route through jax.nn's XLA twin, and the
  flash kernel per shard on a tensor=2 mesh) and paged decoding (XLA gather, our paged kernel)
  against the loop reference with -slope * distance on the logits."""
  from jaxllm.config import MeshConfig
  from jaxllm.parallel import mesh as mesh_lib
  H, K = 6, 2
  q, k, v, seg = _packed(3, H=H, K=K)
  B, T = q.shape[:2]
  slopes = jnp.asarray(alibi_slopes(H)) * 4  # steeper than the paper's, so the bias dominates
  idx = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
  args = [np.asarray(a) for a in (q, k, v)]
  want = reference(*args, idx, idx, np.asarray(seg), np.asarray(seg), window=9,
                   slopes=np.asarray(slopes))
  assert np.abs(want - reference(*args, idx, idx, np.asarray(seg), np.asarray(seg),
                                 window=9)).max() > 0.1  # ALiBi matters here
  for impl in ("xla", "pallas"):
    got = self_attention(q, k, v, segment_ids=seg, sliding_window=9, impl=impl,
                         alibi_slopes=slopes)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, err_msg=impl)
  got = dot_product_attention(q, k, v, seg, 9, None, slopes, implementation="xla")
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, err_msg="cudnn route")
  with jax.set_mesh(mesh_lib.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))):
    got = jax.jit(lambda *a: self_attention(*a, segment_ids=seg, sliding_window=9,
                                            impl="pallas", alibi_slopes=slopes))(q, k, v)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, err_msg="pallas on a mesh")
  # Paged: the last 3 of each sequence's tokens, K/V in 16-token pages (no segments).
  want = reference(*args, idx, idx, slopes=np.asarray(slopes))[:, -3:]
  P, M = 16, -(-T // 16)
  pages = lambda x: x.reshape(B * M, P, K, -1)
  kv = [jnp.pad(x, ((0, 0), (0, M * P - T), (0, 0), (0, 0))) for x in (k, v)]
  table = jnp.arange(B * M, dtype=jnp.int32).reshape(B, M)
  lengths = jnp.full((B,), T, jnp.int32)
  for impl in ("xla", "pallas"):
    got = paged_attention(q[:, -3:], pages(kv[0]), pages(kv[1]), lengths, table, impl=impl,
                          alibi_slopes=slopes)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, err_msg=f"paged {impl}")


@pytest.mark.parametrize("mesh", [dict(data=2, context=4), dict(fsdp=2, context=2, tensor=2)])
def test_ring_flash_attention_matches_xla_forward_and_gradients(mesh):
  """The flash kernel on every ring block (load-balanced order, packed segments with padding):
  output and gradients of q, k, v equal the single-device XLA attention's."""
  from jaxllm.config import MeshConfig
  from jaxllm.ops import ring_attention
  from jaxllm.parallel import mesh as mesh_lib
  q, k, v, seg = _packed(6, H=4, K=2)
  B, T = q.shape[:2]
  w = jnp.asarray(np.random.default_rng(7).normal(size=q.shape), jnp.float32)

  def loss_and_grads(attend):
    f = lambda q, k, v: jnp.sum(attend(q, k, v) * w)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))

  want = loss_and_grads(lambda q, k, v: self_attention(q, k, v, segment_ids=seg, impl="xla"))(
      q, k, v)
  order = ring_attention.load_balance_order(T, mesh["context"])
  perm = lambda x: x[:, order]
  w = perm(w)
  with jax.set_mesh(mesh_lib.make_mesh(MeshConfig(**{"data": 1, **mesh}))):
    got = loss_and_grads(lambda q, k, v: self_attention(
        q, k, v, segment_ids=perm(seg), impl="pallas", context_parallel="ring",
        load_balanced=True))(perm(q), perm(k), perm(v))
  np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
  for g, ref in zip(got[1], want[1]):
    np.testing.assert_allclose(np.asarray(g)[:, np.argsort(order)], np.asarray(ref), atol=2e-5)


def test_ring_attention_matches_xla_in_any_token_order():
  """Ring attention over context=4 (K/V blocks passed by ppermute, partial results merged by
  log-sum-exp), tokens in the load-balanced order, with packed segments, a window and ALiBi."""
  from jaxllm.config import MeshConfig
  from jaxllm.ops import ring_attention
  from jaxllm.parallel import mesh as mesh_lib
  q, k, v, seg = _packed(5, H=4, K=2)
  B, T = q.shape[:2]
  slopes = jnp.asarray(alibi_slopes(4))
  want = self_attention(q, k, v, segment_ids=seg, sliding_window=9, impl="xla",
                        alibi_slopes=slopes)
  order = ring_attention.load_balance_order(T, 4)
  perm = lambda x: x[:, order]
  index = jnp.broadcast_to(jnp.asarray(order, jnp.int32), (B, T))
  f = jax.jit(lambda q, k, v, seg, index: self_attention(
      q, k, v, segment_ids=seg, sliding_window=9, alibi_slopes=slopes, index=index,
      context_parallel="ring"))
  with jax.set_mesh(mesh_lib.make_mesh(MeshConfig(data=2, context=4))):
    got = f(perm(q), perm(k), perm(v), perm(seg), index)
  np.testing.assert_allclose(np.asarray(got)[:, np.argsort(order)], np.asarray(want), atol=2e-5)
