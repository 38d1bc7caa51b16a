"""Paged attention, both lowerings in the Pallas interpreter (or compiled, on the device that runs
one natively), against gathering the pages and
running the plain reference; and against flash attention on the same (contiguous) keys."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import pallas_kernels as pk
from pallas_kernels import backends
from pallas_kernels.paged_attention import gather_pages

# The compiled kernel where the default device runs it (a GPU for "gpu"), else the interpreter.
INTERPRET = {b: not backends.runs_natively(b) for b in backends.BACKENDS}

# (B, T (0 = decode, q [B, H, Dh]), H, K, Dh, page_size, pool pages, max_pages, lengths, extra)
CASES = {
    "decode_gqa2": (3, 0, 4, 2, 64, 16, 20, 6, [1, 37, 96], {}),
    "decode_mqa8": (2, 0, 8, 1, 128, 16, 12, 4, [16, 50], {}),
    "verify_T4": (2, 4, 6, 2, 64, 16, 20, 5, [9, 70], {}),
    "verify_window": (2, 3, 8, 1, 128, 32, 10, 4, [20, 100], {"sliding_window": 17}),
    "decode_int8": (2, 0, 4, 4, 64, 16, 20, 5, [33, 64], {"int8": True}),
    "chunk_int8_Dh256": (1, 5, 2, 1, 256, 16, 8, 4, [41], {"int8": True}),
    # 70 tokens x 4 query heads per KV head = 280 rows: two TPU row blocks, the last one ragged.
    "prefill_row_blocks": (1, 70, 8, 2, 64, 16, 8, 6, [90], {}),
    # ALiBi: per-head slopes on the rows of each KV head's group, decode and a two-block chunk.
    "decode_alibi_gqa3": (3, 0, 6, 2, 64, 16, 20, 6, [1, 37, 96], {"alibi": True}),
    "prefill_alibi_window_int8": (1, 70, 8, 2, 64, 16, 8, 6, [90],
                                  {"alibi": True, "sliding_window": 40, "int8": True}),
}


def _inputs(case, dtype=jnp.float32, seed=0):
  B, T, H, K, Dh, P, N, M, lengths, extra = case
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((B, T, H, Dh) if T else (B, H, Dh)), dtype)
  kw = {k: v for k, v in extra.items() if k not in ("int8", "alibi")}
  if extra.get("alibi"):
    kw["alibi_slopes"] = jnp.asarray(rng.uniform(0.01, 0.5, H), jnp.float32)
  if extra.get("int8"):
    k_pages, v_pages = (jnp.asarray(rng.integers(-127, 128, (N, P, K, Dh)), jnp.int8)
                        for _ in range(2))
    kw["k_scales"], kw["v_scales"] = (jnp.asarray(rng.uniform(0.002, 0.02, (N, P, K)),
                                                  jnp.float32) for _ in range(2))
  else:
    k_pages, v_pages = (jnp.asarray(rng.standard_normal((N, P, K, Dh)), dtype) for _ in range(2))
  # Each sequence owns distinct, shuffled pages; unused slots point anywhere (here: page 0).
  table = rng.permutation(N)[:B * M].reshape(B, M)
  for b, n in enumerate(lengths):
    table[b, -(-n // P):] = 0
  return q, k_pages, v_pages, jnp.asarray(lengths, jnp.int32), jnp.asarray(table, jnp.int32), kw


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_gathered_reference(backend, name):
  q, kp, vp, lengths, table, kw = _inputs(CASES[name])
  got = pk.paged_attention(q, kp, vp, lengths, table, backend=backend,
                           interpret=INTERPRET[backend], **kw)
  want = pk.paged_attention_reference(q, kp, vp, lengths, table, **kw)
  assert got.shape == q.shape and got.dtype == q.dtype
  assert float(jnp.abs(got - want).max()) <= 2e-5


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_bfloat16(backend):
  q, kp, vp, lengths, table, kw = _inputs(CASES["verify_T4"], jnp.bfloat16)
  got = pk.paged_attention(q, kp, vp, lengths, table, backend=backend,
                           interpret=INTERPRET[backend], **kw)
  want = pk.paged_attention_reference(q.astype(jnp.float32), kp.astype(jnp.float32),
                                      vp.astype(jnp.float32), lengths, table, **kw)
  assert got.dtype == jnp.bfloat16
  assert float(jnp.abs(got.astype(jnp.float32) - want).max()) <= 2e-2


def test_agrees_with_flash_attention_on_contiguous_keys():
  """An independent route: the same keys laid out contiguously, through the flash kernel."""
  q, kp, vp, lengths, table, _ = _inputs(CASES["verify_T4"])
  got = pk.paged_attention(q, kp, vp, lengths, table, backend="gpu",
                           interpret=INTERPRET["gpu"])
  k, v = gather_pages(kp, table), gather_pages(vp, table)
  for b, n in enumerate(np.asarray(lengths)):
    want = pk.flash_attention(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n], causal=True,
                              backend="gpu", interpret=INTERPRET["gpu"])
    assert float(jnp.abs(got[b:b + 1] - want).max()) <= 2e-5


def _step_program(backend, dtype, T, H, K, Dh, int8, alibi=False):
  """(the kernel as a function of its inputs, their abstract values): T = 0 is a decode step."""
  B, N, P, M = 4, 64, 16, 8
  S = jax.ShapeDtypeStruct
  q = S((B, T, H, Dh) if T else (B, H, Dh), dtype)
  pages = S((N, P, K, Dh), jnp.int8 if int8 else dtype)
  args = [q, pages, pages, S((B,), jnp.int32), S((B, M), jnp.int32)]
  if int8:
    args += [S((N, P, K), jnp.float32)] * 2
  if alibi:
    args += [S((H,), jnp.float32)]

  def f(q, k, v, lengths, table, *extra):
    kw = dict(k_scales=extra[0], v_scales=extra[1]) if int8 else {}
    if alibi:
      kw["alibi_slopes"] = extra[-1]
    return pk.paged_attention(q, k, v, lengths, table, backend=backend, **kw)

  return f, args


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("dtype, T, Dh, int8, alibi", [
    (jnp.bfloat16, 0, 128, False, False), (jnp.float32, 4, 64, False, True),
    (jnp.bfloat16, 0, 64, True, False), (jnp.bfloat16, 3, 256, False, False)])
def test_lowers_for_real_hardware(backend, dtype, T, Dh, int8, alibi):
  f, args = _step_program(backend, dtype, T, 8, 2, Dh, int8, alibi)
  text = backends.lower_for(backend, f, *args)
  assert ("__gpu$xla.gpu.triton" if backend == "gpu" else "tpu_custom_call") in text


@pytest.mark.skipif(not backends.libtpu_available(),
                    reason="needs libtpu (pip install 'jaxllm[tpu]'); CI installs it")
@pytest.mark.parametrize("dtype, T, H, K, Dh, int8, alibi", [
    (jnp.bfloat16, 0, 8, 2, 128, False, False), (jnp.float32, 4, 8, 2, 64, False, True),
    (jnp.bfloat16, 0, 8, 2, 64, True, False),
    # Llama-3-8B's heads, a 512-token prefill chunk (ALiBi: its slopes ride with each row block)
    (jnp.bfloat16, 512, 32, 8, 128, False, True)])
def test_compiles_for_tpu(dtype, T, H, K, Dh, int8, alibi):
  """Decode, verify and prefill-chunk steps compiled by libtpu (Mosaic included, so its VMEM
  budget is checked), bf16/fp32, int8 pages and ALiBi slopes."""
  f, args = _step_program("tpu", dtype, T, H, K, Dh, int8, alibi)
  assert "tpu_custom_call" in backends.compile_for_tpu(f, *args)


@pytest.mark.parametrize("change, match", [
    (dict(q=(2, 3, 64)), "multiple of kv heads"),
    (dict(lengths=(3,)), "lengths"),
    (dict(pages=(8, 16, 2, 32)), "k_pages"),
    (dict(pages=(8, 12, 2, 64)), "page_size 12"),
    (dict(int8_without_scales=True), "int8 pages need"),
])
def test_bad_input_is_a_clear_error(change, match):
  q = jnp.zeros(change.get("q", (2, 4, 64)))
  pages = jnp.zeros(change.get("pages", (8, 16, 2, 64)),
                    jnp.int8 if change.get("int8_without_scales") else jnp.float32)
  lengths = jnp.zeros(change.get("lengths", (2,)), jnp.int32)
  with pytest.raises(ValueError, match=match):
    pk.paged_attention(q, pages, pages, lengths, jnp.zeros((2, 4), jnp.int32), backend="gpu",
                       interpret=True)
