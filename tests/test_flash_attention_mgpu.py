"""Flash attention's Mosaic GPU forward (`backend="mosaic_gpu"`, Triton backward) against the
plain-jnp reference: in Mosaic GPU's interpreter on CPU (jax >= 0.11: CI's main run, python
3.12 with jax 0.12), compiled on a Hopper GPU; and its real lowering for an H100 on any jax.
"""

import dataclasses

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import pallas_kernels as pk
from pallas_kernels.flash_attention import mosaic_gpu

ON_GPU = jax.default_backend() == "gpu"
needs_mosaic_gpu = pytest.mark.skipif(
    not (ON_GPU or mosaic_gpu.interpreter_available()),
    reason=f"jax {jax.__version__} has no Mosaic GPU interpreter (jax >= 0.11; CI's main run "
           "has jax 0.12)")

# (B, T, S, H, K, Dh, causal, block_q): padding to whole 128-row / 128-key tiles, queries after
# a prefix (T < S), grouped kv heads, several key blocks, a wide head, one compute warpgroup.
CASES = {
    "causal_padded_gqa2": (1, 100, 100, 4, 2, 64, True, None),
    "causal_T<S_mqa": (1, 60, 200, 3, 1, 64, True, None),
    "full_padded_keys": (2, 64, 150, 2, 2, 64, False, None),
    "causal_Dh128_blocks": (1, 256, 320, 2, 1, 128, True, None),
    "causal_one_warpgroup": (1, 192, 192, 2, 1, 64, True, 64),
}


def _inputs(case, seed=0):
  B, T, S, H, K, Dh = case[:6]
  rng = np.random.default_rng(seed)
  q, do = (jnp.asarray(rng.standard_normal((B, T, H, Dh)), jnp.bfloat16) for _ in range(2))
  k, v = (jnp.asarray(rng.standard_normal((B, S, K, Dh)), jnp.bfloat16) for _ in range(2))
  return q, k, v, do


@needs_mosaic_gpu
@pytest.mark.parametrize("name", list(CASES))
def test_forward_lse_and_gradients_equal_the_reference(name):
  case = CASES[name]
  causal, block_q = case[6:]
  q, k, v, do = _inputs(case)
  blocks = None if block_q is None else mosaic_gpu.default_block_sizes(case[5])
  if blocks is not None:
    blocks = dataclasses.replace(blocks, block_q=block_q)

  def ours(q, k, v):
    return pk.flash_attention(q, k, v, causal=causal, backend="mosaic_gpu",
                              interpret=not ON_GPU, return_lse=True, block_sizes=blocks)

  def reference(q, k, v):
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    return pk.attention_reference(*f32, causal=causal, return_lse=True)

  (out, lse), vjp = jax.vjp(ours, q, k, v)
  (ref_out, ref_lse), ref_vjp = jax.vjp(reference, q, k, v)
  assert out.shape == q.shape and out.dtype == jnp.bfloat16 and lse.shape == ref_lse.shape
  np.testing.assert_allclose(np.asarray(out, np.float32), ref_out, atol=2e-2, rtol=2e-2)
  np.testing.assert_allclose(lse, ref_lse, atol=1e-3, rtol=1e-4)
  dlse = jnp.zeros_like(lse)
  for got, want in zip(vjp((do, dlse)), ref_vjp((do.astype(jnp.float32), dlse))):
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(np.asarray(got, np.float32) / scale, want / scale, atol=2e-2)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_lowers_for_an_h100_mosaic_forward_and_triton_backward(head_dim):
  """The real lowering, no GPU needed (`backends.lower_for`): Mosaic GPU's own layout and op
  checks pass for the forward, Triton's for the two backward kernels; PTX is the hardware's."""
  from pallas_kernels import backends
  q = jax.ShapeDtypeStruct((1, 256, 2, head_dim), jnp.bfloat16)

  def loss(q, k, v):
    out = pk.flash_attention(q, k, v, causal=True, backend="mosaic_gpu")
    return out.astype(jnp.float32).sum()
  text = backends.lower_for("gpu", jax.grad(loss, argnums=(0, 1, 2)), q, q, q)
  assert "custom_call @mosaic_gpu" in text
  assert text.count("__gpu$xla.gpu.triton") == 2  # dq, then dk/dv


def test_options_it_does_not_compute_are_refused_in_one_line():
  q = jnp.zeros((1, 64, 2, 64), jnp.bfloat16)
  for kwargs, reason in [({"sliding_window": 8}, "a sliding window"),
                         ({"segment_ids": jnp.ones((1, 64), jnp.int32)}, "segment ids"),
                         ({"logit_soft_cap": 5.0}, "a logit soft cap")]:
    with pytest.raises(ValueError, match=f"does not take {reason}: use backend='gpu'"):
      pk.flash_attention(q, q, q, backend="mosaic_gpu", interpret=True, **kwargs)
  with pytest.raises(ValueError, match="bf16 or f16 only"):
    pk.flash_attention(*(q.astype(jnp.float32),) * 3, backend="mosaic_gpu", interpret=True)
  if not ON_GPU:
    with pytest.raises(ValueError, match="runs natively on a GPU only"):
      pk.flash_attention(q, q, q, backend="mosaic_gpu")
  with pytest.raises(ValueError, match="block_q 64 or 128"):
    pk.flash_attention(q, q, q, backend="mosaic_gpu", interpret=True,
                       block_sizes=pk.BlockSizes(block_q=256, block_k=128))
