"""The C++ small-batch matmul kernel for XLA:CPU (`jaxllm.ops.cpu_gemv`) against XLA's own
products of the same weights dequantized: every weight kind and layout, ragged groups, the
batch limit, gradients through it, a whole model's forward, and the fallback without a
compiler."""

import logging

import chex
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.model import cache as kv_cache
from jaxllm.model import transformer
from jaxllm.ops import cpu_gemv, quant_matmul
from jaxllm.quant import params as qparams
from jaxllm.quant import tensor as qtensor
from tests.helpers import tiny_model

# (bits, group_size, symmetric); bits 0: a float32 weight. Group 24 of 100 rows: ragged.
WEIGHTS = [(0, 0, True), (8, 0, True), (8, 24, False), (4, 32, True), (4, 24, False)]


def _weight(kind, rows, cols, seed=0, batch_axes=0):
  bits, group, symmetric = kind
  shape = (cols, rows) if batch_axes else (rows, cols)
  w = jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)
  if not bits:
    return w, w
  q = qtensor.quantize(w, bits=bits, group_size=group, symmetric=symmetric,
                       batch_axes=batch_axes)
  return q, q.dequantize()


# Built at collection; CI's machines have g++, so there this skips nothing.
needs_kernel = pytest.mark.skipif(not cpu_gemv.available(), reason="no C++ compiler")


@needs_kernel
class KernelTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matmul_equals_xla_on_the_dequantized_weight(self):
    for kind in WEIGHTS:
      for M in (1, 5, 16):
        w, w_float = _weight(kind, 100, 40, seed=M)
        x = jnp.asarray(np.random.default_rng(M).standard_normal((M, 100)), jnp.float32)
        got = self.variant(cpu_gemv.matmul)(x, w)
        chex.assert_shape(got, (M, 40))
        chex.assert_trees_all_close(got, x @ w_float, rtol=1e-5, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_rows_layout_equals_xla_on_the_dequantized_table(self):
    """The tied head: x `[M, D]` times a `[V, D]` table, stored per row (LAYOUTS["embed"])."""
    for kind in WEIGHTS:
      table, table_float = _weight(kind, 100, 300, seed=1, batch_axes=1)
      x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 100)), jnp.float32)
      got = self.variant(cpu_gemv.matmul_rows)(x, table)
      chex.assert_shape(got, (3, 300))
      chex.assert_trees_all_close(got, x @ table_float.T, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_products_from_several_threads_at_once_are_each_right():
  """Concurrent calls share the kernel's helper threads (one call at a time uses them, the
  others run alone): every result must still be its own product, none mixed with another's."""
  import concurrent.futures
  kinds = [(8, 0, True), (4, 32, True), (0, 0, True)]
  cases = []
  for i, kind in enumerate(kinds):
    w, w_float = _weight(kind, 256, 512, seed=10 + i)
    x = jnp.asarray(np.random.default_rng(i).standard_normal((1, 256)), jnp.float32)
    cases.append((jax.jit(cpu_gemv.matmul), x, w, np.asarray(x @ w_float)))

  def run(case):
    fn, x, w, want = case
    for _ in range(200):
      np.testing.assert_allclose(np.asarray(fn(x, w)), want, rtol=1e-5, atol=1e-4)

  with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
    for future in [pool.submit(run, case) for case in cases]:
      future.result()


def test_project_takes_the_kernel_only_for_small_float32_batches():
  int8, _ = _weight((8, 0, True), 64, 32)
  table, _ = _weight((8, 0, True), 64, 32, batch_axes=1)
  float32 = jnp.zeros((64, 32), jnp.float32)
  x = lambda m, dtype=jnp.float32: jnp.zeros((m, 64), dtype)
  hlo = lambda m, w=int8, dtype=jnp.float32, fn=quant_matmul.project: jax.jit(fn).lower(
      x(m, dtype), w).as_text()
  with cpu_gemv.cpu_kernel("always"):
    limits = cpu_gemv.MAX_ROWS
    for w, fn, limit in ((int8, quant_matmul.project, limits["quantized"]),
                         (float32, quant_matmul.project, limits["float"]),
                         (table, quant_matmul.project_rows, limits["quantized_table"])):
      assert cpu_gemv.TARGET in hlo(limit, w, fn=fn) and cpu_gemv.TARGET not in hlo(
          limit + 1, w, fn=fn)
    assert cpu_gemv.TARGET not in hlo(1, float32.T, fn=quant_matmul.project_rows)  # XLA's
    assert cpu_gemv.TARGET not in hlo(4, dtype=jnp.bfloat16)
  with cpu_gemv.cpu_kernel("never"):
    assert cpu_gemv.TARGET not in hlo(1)
  # The test process has 8 CPU devices: "auto" leaves possibly sharded weights to XLA.
  assert cpu_gemv.TARGET not in hlo(1)
  with pytest.raises(ValueError, match="one of"):
    with cpu_gemv.cpu_kernel("sometimes"):
      pass


@needs_kernel
def test_gradients_through_the_kernel_are_xlas():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 24)), jnp.float32)
  w = jnp.asarray(np.random.default_rng(1).standard_normal((24, 4, 5)), jnp.float32)
  table = jnp.asarray(np.random.default_rng(2).standard_normal((7, 20)), jnp.float32)
  loss = lambda x, w, t: jnp.sum(jnp.sin(quant_matmul.project_rows(
      quant_matmul.project(x, w).reshape(2, 3, 20), t)))
  grads = {}
  for mode in ("always", "never"):
    with cpu_gemv.cpu_kernel(mode):
      grads[mode] = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, w, table)
  chex.assert_trees_all_close(grads["always"], grads["never"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits, head_bits", [(0, 0), (8, 8), (4, 4)])
@needs_kernel
def test_model_forward_through_the_kernel_equals_xla(bits, head_bits):
  """A tiny model's forward over 2 tokens, and 12 tokens decoded against a KV cache (a
  prefill of 8, then 4 steps of one: the products a kernel call where `MAX_ROWS` allows, each
  layer read in place from the stacks; attention over the cache the kernel library's too),
  against the same model on XLA's products and attention."""
  cfg = tiny_model(dtype="float32", d_model=48)
  graphdef, params = transformer.split(transformer.create(cfg, 0))
  if bits:
    params, _ = qparams.quantize_params(params, qparams.QuantSpec(
        bits=bits, group_size=16, head_bits=head_bits, head_group_size=16))
  ids = jnp.arange(12, dtype=jnp.int32)[None] % cfg.vocab_size

  def decode(p, ids):
    """Prefill 8 tokens, then 4 decode steps of one (layers read by index: `LayerView`)."""
    model = nnx.merge(graphdef, p)
    cache = kv_cache.init_cache(cfg.n_layers, 1, 16, cfg.n_kv_heads, cfg.head_dim)
    first, cache = model.extend(ids[:, :8], cache)
    steps = []
    for t in range(8, 12):
      step, cache = model.extend(ids[:, t:t + 1], cache)
      steps.append(step)
    return jnp.concatenate([first, *steps], axis=1)

  logits = {}
  for mode in ("always", "never"):
    with cpu_gemv.cpu_kernel(mode):
      for name, fn in (("forward", lambda p, ids: nnx.merge(graphdef, p)(ids[:, :2])),
                       ("decode", lambda p, ids: decode(p, ids))):
        fn = jax.jit(fn)  # a new function object: traced anew, in this mode
        text = fn.lower(params, ids).as_text()
        assert (cpu_gemv.TARGET in text) == (mode == "always")
        if name == "decode":  # attention over the cache too (`jaxllm.ops.cpu_attention`)
          assert (cpu_gemv.ATTENTION_TARGET in text) == (mode == "always")
        logits[mode, name] = fn(params, ids)
  for name in ("forward", "decode"):
    chex.assert_trees_all_close(logits["always", name], logits["never", name], rtol=1e-5,
                                atol=1e-5)
  chex.assert_trees_all_close(logits["always", "decode"][:, :2], logits["never", "forward"],
                              rtol=1e-4, atol=1e-4)


def test_without_a_compiler_products_take_xlas_path(monkeypatch, tmp_path, caplog):
  monkeypatch.setenv("JAXLLM_CACHE", str(tmp_path))  # nothing built there
  monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
  cpu_gemv.available.cache_clear()
  try:
    with caplog.at_level(logging.WARNING, logger=cpu_gemv.__name__):
      assert not cpu_gemv.available()
    assert "XLA's matmuls instead" in caplog.text
    w, w_float = _weight((8, 0, True), 16, 8)
    x = jnp.ones((1, 16), jnp.float32)
    with cpu_gemv.cpu_kernel("always"):
      lowered = jax.jit(quant_matmul.project).lower(x, w).as_text()
      chex.assert_trees_all_close(quant_matmul.project(x, w), x @ w_float, rtol=1e-6)
    assert cpu_gemv.TARGET not in lowered
  finally:
    cpu_gemv.available.cache_clear()
