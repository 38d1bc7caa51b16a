"""Flash attention, both lowerings in the Pallas interpreter (or compiled, on the device that runs
one natively), against the plain-jnp reference.

Forward and gradients over a grid of shapes and options; the reference itself against a numpy
loop; block skipping against brute force; and the real (non-interpreted) lowerings for an H100
and a TPU v5p, which must get through Triton / Mosaic lowering without the hardware.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import pallas_kernels as pk
from pallas_kernels import backends
from pallas_kernels.flash_attention import common
from pallas_kernels.flash_attention.common import BlockSizes

# The compiled kernel where the default device runs it (a GPU for "gpu"), else the interpreter.
INTERPRET = {b: not backends.runs_natively(b) for b in backends.BACKENDS}

# Small tiles so short sequences still span several blocks (TPU keys tile in lanes: 128).
TEST_BLOCKS = {"gpu": BlockSizes(block_q=32, block_k=32, block_q_bwd=16, block_k_bwd=32),
               "tpu": BlockSizes(block_q=32, block_k=128, block_q_bwd=16, block_k_bwd=128)}
SLOPES4 = (0.5, 0.25, 0.125, 0.0625)


def _segments(B, T, seed):
  rng = np.random.default_rng(seed)
  cuts = np.sort(rng.choice(np.arange(1, T), size=(B, 3), replace=True), axis=1)
  return jnp.asarray((np.arange(T)[None, :, None] >= cuts[:, None, :]).sum(-1) + 1, jnp.int32)


# (B, T, S, H, K, Dh, options)
CASES = {
    "causal_odd": (1, 37, 37, 2, 2, 64, {}),
    "causal_T<S_gqa3": (1, 45, 77, 3, 1, 64, {}),
    "full_T<S": (2, 33, 70, 4, 4, 64, {"causal": False}),
    "gqa8": (1, 50, 50, 8, 1, 64, {}),
    "window": (2, 70, 70, 4, 2, 64, {"sliding_window": 9}),
    "window_T<S": (1, 30, 90, 3, 1, 64, {"sliding_window": 20}),
    "segments": (2, 70, 70, 4, 2, 64, {"segment_ids": "seg"}),
    "alibi_full": (1, 40, 40, 4, 2, 64, {"causal": False, "alibi_slopes": SLOPES4}),
    "softcap_Dh128": (1, 40, 60, 3, 3, 128, {"logit_soft_cap": 5.0}),
    "Dh256_scale": (1, 33, 33, 2, 1, 256, {"sm_scale": 0.1}),
    "everything": (2, 60, 60, 4, 2, 64, {"sliding_window": 17, "segment_ids": "seg",
                                          "alibi_slopes": SLOPES4, "logit_soft_cap": 8.0}),
    "long_multi_block": (1, 200, 300, 2, 1, 64, {}),
}
BF16_CASES = {"bf16_gqa8": (1, 50, 50, 8, 1, 128, {}),
              "bf16_window_segments": (2, 70, 70, 4, 2, 64,
                                       {"sliding_window": 9, "segment_ids": "seg"})}


def _inputs(case, dtype, seed=0):
  B, T, S, H, K, Dh, opts = case
  rng = np.random.default_rng(seed)
  q, do = (jnp.asarray(rng.standard_normal((B, T, H, Dh)), dtype) for _ in range(2))
  k, v = (jnp.asarray(rng.standard_normal((B, S, K, Dh)), dtype) for _ in range(2))
  opts = dict(opts)
  if opts.get("segment_ids") == "seg":
    opts["segment_ids"] = _segments(B, T, seed)
  if "alibi_slopes" in opts:
    opts["alibi_slopes"] = jnp.asarray(opts["alibi_slopes"], jnp.float32)
  return q, k, v, do, opts


def _run(backend, q, k, v, do, opts, block_sizes):
  f = lambda q, k, v: pk.flash_attention(q, k, v, backend=backend,
                                         interpret=INTERPRET[backend], block_sizes=block_sizes,
                                         **opts)
  out, vjp = jax.vjp(f, q, k, v)
  return (out, *vjp(do))


def _reference(q, k, v, do, opts):
  up = lambda x: x.astype(jnp.float32)
  out, vjp = jax.vjp(lambda q, k, v: pk.attention_reference(q, k, v, **opts), up(q), up(k), up(v))
  return (out, *vjp(up(do)))


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("name", list(CASES))
def test_float32_forward_and_gradients_match_reference(backend, name):
  q, k, v, do, opts = _inputs(CASES[name], jnp.float32)
  got = _run(backend, q, k, v, do, opts, TEST_BLOCKS[backend])
  want = _reference(q, k, v, do, opts)
  for label, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    assert g.shape == w.shape and g.dtype == jnp.float32
    err = float(jnp.abs(g - w).max())
    assert err <= 2e-5, (label, err)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("name", list(BF16_CASES))
def test_bfloat16_forward_and_gradients_match_reference(backend, name):
  q, k, v, do, opts = _inputs(BF16_CASES[name], jnp.bfloat16)
  got = _run(backend, q, k, v, do, opts, TEST_BLOCKS[backend])
  want = _reference(q, k, v, do, opts)  # float32 math on the same bf16 inputs
  for label, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    assert g.dtype == jnp.bfloat16
    # 2e-2 absolute for O(1) values; beyond |x| = 1 one bf16 rounding alone is 2^-8 |x|.
    err = float((jnp.abs(g.astype(jnp.float32) - w) / jnp.maximum(1.0, jnp.abs(w))).max())
    assert err <= 2e-2, (label, err)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_log_sum_exp_and_its_gradient_match_reference(backend):
  """`return_lse`, as ring attention uses it: blocks of other keys (T != S, not causal, the
  keys' own segment ids); a loss of both outputs differentiates through the lse too."""
  q, k, v, do, _ = _inputs((2, 40, 72, 4, 2, 64, {}), jnp.float32, seed=3)
  seg, kv_seg = _segments(2, 40, 1), _segments(2, 72, 2)
  dlse = jnp.asarray(np.random.default_rng(4).standard_normal((2, 4, 40)), jnp.float32)
  opts = dict(causal=False, segment_ids=seg, kv_segment_ids=kv_seg)

  def loss(attend):
    def f(q, k, v):
      out, lse = attend(q, k, v)
      return jnp.sum(out * do) + jnp.sum(lse * dlse), (out, lse)
    return jax.grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)

  (dq, dk, dv), (out, lse) = loss(lambda q, k, v: pk.flash_attention(
      q, k, v, backend=backend, interpret=INTERPRET[backend], block_sizes=TEST_BLOCKS[backend],
      return_lse=True, **opts))
  (wq, wk, wv), (want_out, want_lse) = loss(lambda q, k, v: pk.attention_reference(
      q, k, v, return_lse=True, **opts))
  assert lse.shape == (2, 4, 40) and lse.dtype == jnp.float32
  for label, g, w in (("out", out, want_out), ("lse", lse, want_lse), ("dq", dq, wq),
                      ("dk", dk, wk), ("dv", dv, wv)):
    err = float(jnp.abs(g - w).max())
    assert err <= 2e-5, (label, err)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_default_block_sizes(backend):
  q, k, v, do, opts = _inputs((1, 150, 150, 2, 1, 64, {"sliding_window": 40}), jnp.float32)
  got = _run(backend, q, k, v, do, opts, None)
  for g, w in zip(got, _reference(q, k, v, do, opts)):
    assert float(jnp.abs(g - w).max()) <= 2e-5


def _numpy_attention(q, k, v, causal, window, slopes, cap, scale):
  """A loop over heads and rows in float64: the reference's own oracle."""
  B, T, H, Dh = q.shape
  S, K = k.shape[1], k.shape[2]
  out = np.zeros(q.shape)
  for b in range(B):
    for h in range(H):
      for t in range(T):
        qp = t + S - T
        s = k[b, :, h // (H // K)].astype(np.float64) @ q[b, t, h].astype(np.float64) * scale
        if cap is not None:
          s = cap * np.tanh(s / cap)
        if slopes is not None:
          s = s - slopes[h] * np.abs(qp - np.arange(S))
        visible = np.ones(S, bool)
        if causal:
          visible &= np.arange(S) <= qp
        if window is not None:
          visible &= np.arange(S) > qp - window
        p = np.exp(np.where(visible, s - s[visible].max(), -np.inf))
        out[b, t, h] = p / p.sum() @ v[b, :, h // (H // K)]
  return out


@pytest.mark.parametrize("causal, window, alibi, cap", [
    (True, None, False, None), (False, None, True, 3.0), (True, 5, True, None)])
def test_reference_matches_numpy_loop(causal, window, alibi, cap):
  rng = np.random.default_rng(1)
  q = rng.standard_normal((1, 9, 4, 8)).astype(np.float32)
  k, v = (rng.standard_normal((1, 13, 2, 8)).astype(np.float32) for _ in range(2))
  slopes = np.asarray(SLOPES4) if alibi else None
  got = pk.attention_reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), causal=causal,
                               sliding_window=window, logit_soft_cap=cap,
                               alibi_slopes=None if slopes is None else jnp.asarray(slopes))
  want = _numpy_attention(q, k, v, causal, window, slopes, cap, 8 ** -0.5)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


@pytest.mark.parametrize("T, S, causal, window, bq, bk", [
    (64, 64, True, None, 16, 16), (30, 90, True, 20, 8, 16), (100, 100, True, 7, 32, 16),
    (40, 40, False, None, 16, 8), (17, 50, True, 64, 8, 8)])
def test_block_ranges_visit_exactly_the_blocks_with_visible_keys(T, S, causal, window, bq, bk):
  opts = common.Options(T=T, S=S, groups=1, causal=causal, sliding_window=window,
                        logit_soft_cap=None, sm_scale=1.0, has_segments=False, has_alibi=False)
  nq, nk = -(-T // bq), -(-S // bk)
  visible = np.asarray(common.mask((nq * bq, nk * bk), opts, 0, 0))[:T]
  needed = visible.reshape(T, nk, bk).any(-1)
  for i in range(nq):
    rows = needed[i * bq:(i + 1) * bq].any(0)
    lo, hi = (int(x) for x in common.kv_block_range(jnp.int32(i), bq, bk, nk, opts))
    assert [j for j in range(nk) if rows[j]] == list(range(lo, hi)), (i, lo, hi)
  for j in range(nk):
    cols = needed[:, j]
    blocks = sorted({r // bq for r in np.flatnonzero(cols)})
    lo, hi = (int(x) for x in common.q_block_range(jnp.int32(j), bq, bk, nq, opts))
    assert set(blocks) <= set(range(lo, hi)), (j, blocks, lo, hi)
    # Tight up to the ragged last query block.
    assert hi - lo <= len(blocks) + 1, (j, blocks, lo, hi)


def _fwd_bwd_program(backend, dtype, T, H, K, Dh, opts):
  """(forward + backward of the kernel as a function, its abstract q, k, v, segment_ids)."""
  B = 2
  qs = jax.ShapeDtypeStruct((B, T, H, Dh), dtype)
  ks = jax.ShapeDtypeStruct((B, T, K, Dh), dtype)
  seg = jax.ShapeDtypeStruct((B, T), jnp.int32)

  def fwd_bwd(q, k, v, segment_ids):
    kw = dict(opts, segment_ids=segment_ids if opts.get("segment_ids") else None)
    if kw.get("alibi_slopes"):
      kw["alibi_slopes"] = jnp.linspace(0.1, 1.0, H)
    out, vjp = jax.vjp(lambda q, k, v: pk.flash_attention(q, k, v, backend=backend, **kw),
                       q, k, v)
    return out, vjp(out)

  return fwd_bwd, (qs, ks, ks, seg)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("dtype, Dh, opts", [
    (jnp.bfloat16, 128, {}), (jnp.float32, 64, {"causal": False}),
    (jnp.bfloat16, 256, {"sliding_window": 33}), (jnp.bfloat16, 64, {"segment_ids": True}),
    (jnp.bfloat16, 128, {"alibi_slopes": True, "logit_soft_cap": 20.0})])
def test_lowers_for_real_hardware(backend, dtype, Dh, opts):
  """Forward + backward through Triton (H100) or Mosaic (TPU v5p) lowering, no device needed."""
  fn, args = _fwd_bwd_program(backend, dtype, 300, 6, 2, Dh, opts)
  text = backends.lower_for(backend, fn, *args)
  target = "__gpu$xla.gpu.triton" if backend == "gpu" else "tpu_custom_call"
  assert text.count(target) >= 3  # forward, dq, dk/dv kernels


@pytest.mark.skipif(not backends.libtpu_available(),
                    reason="needs libtpu (pip install 'jaxllm[tpu]'); CI installs it")
@pytest.mark.parametrize("dtype, Dh, T, opts", [
    (jnp.bfloat16, 128, 2048, {}), (jnp.float32, 64, 300, {"causal": False}),
    (jnp.bfloat16, 256, 1024, {"sliding_window": 33}),
    (jnp.bfloat16, 64, 1024, {"segment_ids": True}),
    (jnp.bfloat16, 128, 300, {"alibi_slopes": True, "logit_soft_cap": 20.0})])
def test_compiles_for_tpu(dtype, Dh, T, opts):
  """Forward + backward compiled by libtpu (Mosaic included) at the default block sizes."""
  fn, args = _fwd_bwd_program("tpu", dtype, T, 8, 2, Dh, opts)
  assert backends.compile_for_tpu(fn, *args).count("tpu_custom_call") >= 3


@pytest.mark.parametrize("bad, match", [
    (dict(q=(1, 8, 3, 64), k=(1, 8, 2, 64)), "multiple of kv heads"),
    (dict(q=(1, 8, 2, 48), k=(1, 8, 2, 48)), "head_dim 48"),
    (dict(q=(1, 8, 2, 64), k=(1, 8, 2, 32)), "head_dim"),
    (dict(q=(1, 9, 2, 64), k=(1, 8, 2, 64)), "more queries"),
    (dict(sliding_window=4, causal=False), "needs causal"),
    (dict(segment_ids=(1, 7)), "segment_ids"),
    (dict(q=(1, 4, 2, 64), segment_ids=(1, 4)), "pass the keys' as kv_segment_ids"),
    (dict(alibi_slopes=(3,)), "alibi_slopes"),
    (dict(block_sizes=BlockSizes(block_q=24, block_k=32)), "powers of two"),
])
def test_bad_input_is_a_clear_error(bad, match):
  bad = dict(bad)
  q = jnp.zeros(bad.pop("q", (1, 8, 2, 64)))
  k = jnp.zeros(bad.pop("k", (1, 8, 2, 64)))
  for key in ("segment_ids", "alibi_slopes"):
    if key in bad:
      bad[key] = jnp.zeros(bad[key], jnp.int32 if key == "segment_ids" else jnp.float32)
  with pytest.raises(ValueError, match=match):
    pk.flash_attention(q, k, k, backend="gpu", interpret=True, **bad)


def test_tpu_block_rules_are_enforced():
  q = jnp.zeros((1, 300, 2, 64))
  with pytest.raises(ValueError, match="multiples of 128"):
    pk.flash_attention(q, q, q, backend="tpu", interpret=True,
                       block_sizes=BlockSizes(block_q=32, block_k=64))


def test_cpu_without_interpret_is_a_clear_error():
  if jax.default_backend() != "cpu":
    pytest.skip("checks the CPU-only message")
  q = jnp.zeros((1, 8, 2, 64))
  with pytest.raises(ValueError, match="interpret=True"):
    pk.flash_attention(q, q, q)
