"""int8 KV cache: per-token-per-head quantization, both layouts, the paged kernel's int8 path,
the engine, and scoring through the cache (`jaxllm.eval --kv_cache_dtype`)."""

import dataclasses
import math

import chex
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.eval import scoring
from jaxllm.inference import engine as engine_lib
from jaxllm.inference import generate as gen
from jaxllm.inference import kv_cache, sampling
from jaxllm.model import transformer
from tests.helpers import tiny_model


def test_quantize_kv_error_is_within_half_a_step():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 3, 16)) * jnp.arange(1.0, 4.0).reshape(1, 1, 3, 1)
  values, scales = kv_cache.quantize_kv(x)
  assert values.dtype == jnp.int8 and scales.shape == (2, 5, 3)
  err = jnp.abs(values.astype(jnp.float32) * scales[..., None] - x)
  assert bool(jnp.all(err <= scales[..., None] / 2 + 1e-7))


def _extend_in_chunks(net, cache, ids, cuts):
  outs = []
  for a, b in zip((0, *cuts), (*cuts, ids.shape[1])):
    logits, cache = net.extend(ids[:, a:b], cache)
    outs.append(logits)
  return jnp.concatenate(outs, 1), cache


@pytest.mark.parametrize("impl", ["xla", "pallas"])  # pallas: the paged kernel, interpreted
def test_int8_cache_in_both_layouts_tracks_the_float_model(impl):
  cfg = tiny_model(dtype="float32", attention_impl=impl, head_dim=64, n_heads=2, n_kv_heads=1)
  graphdef, params = transformer.split(transformer.create(cfg, 0))
  net = nnx.merge(graphdef, params)
  ids = jax.random.randint(jax.random.PRNGKey(1), (2, 21), 0, cfg.vocab_size)
  xla_graphdef, _ = transformer.abstract_params(dataclasses.replace(cfg, attention_impl="xla"))
  full = nnx.merge(xla_graphdef, params)(ids)
  contiguous = kv_cache.init_cache(cfg.n_layers, 2, 32, cfg.n_kv_heads, cfg.head_dim, jnp.int8)
  paged = kv_cache.init_paged_cache(cfg.n_layers, 8, 16, cfg.n_kv_heads, cfg.head_dim,
                                    jnp.asarray([[3, 5], [1, 6]]), dtype=jnp.int8)
  got_c, contiguous = _extend_in_chunks(net, contiguous, ids, (7, 20))
  got_p, paged = _extend_in_chunks(net, paged, ids, (7, 20))
  assert isinstance(contiguous.k, kv_cache.Int8KV) and isinstance(paged.v, kv_cache.Int8KV)
  assert paged.k.values.dtype == jnp.int8 and paged.k.scales.shape == (cfg.n_layers, 8, 16,
                                                                        cfg.n_kv_heads)
  # Same per-token quantization in both layouts: the same numbers up to float32 rounding.
  chex.assert_trees_all_close(got_c, got_p, atol=2e-5)
  rel = float(jnp.abs(got_c - full).max() / jnp.abs(full).max())
  assert 0 < rel < 1e-2, rel  # quantized (not bit-identical), but close


def test_engine_with_int8_pages_equals_generate_alone():
  graphdef, params = transformer.split(transformer.create(tiny_model(n_layers=2,
                                                                     init_std=0.4), 3))
  engine = engine_lib.Engine(graphdef, params, engine_lib.EngineConfig(
      max_slots=4, num_pages=40, page_size=8, prefill_chunk=16, cache_dtype="int8"))
  rng = np.random.default_rng(0)
  work = [(rng.integers(0, 64, int(rng.integers(3, 30))).tolist(),
           sampling.SamplingParams(max_tokens=12, temperature=0.0 if i % 2 else 0.9, seed=i))
          for i in range(8)]
  requests = [engine.submit(p, sp) for p, sp in work]
  engine.run_until_idle()
  for r, (prompt, sp) in zip(requests, work):
    want = gen.generate_requests(graphdef, params, [prompt], [sp], cache="paged", page_size=8,
                                 cache_dtype=jnp.int8)[0]
    assert r.tokens == want.tokens


class _Model:
  def __init__(self, cfg, graphdef, params):
    self.config, self.graphdef, self.params = cfg, graphdef, params

  def prompt_ids(self, text):
    return [ord(c) % self.config.vocab_size for c in text]


def test_scoring_through_the_cache():
  cfg = tiny_model(dtype="float32")
  model = _Model(cfg, *transformer.split(transformer.create(cfg, 2)))
  texts = ["def f(x):\n  return x * 2\n" * 5, "import os\nprint(os.getcwd())\n" * 3]
  kw = dict(max_len=32, stride=16, batch_size=2, progress=False)
  plain = scoring.evaluate(model, texts, **kw)
  cached = scoring.evaluate(model, texts, kv_cache_dtype="float32", **kw)
  int8 = scoring.evaluate(model, texts, kv_cache_dtype="int8", **kw)
  assert plain[1] == cached[1] == int8[1]
  assert math.isclose(plain[0], cached[0], rel_tol=1e-5)
  assert int8[0] != cached[0] and math.isclose(plain[0], int8[0], rel_tol=1e-2)
  # Long-context scoring: each window through the cache 12 tokens at a time (32 is not a
  # multiple: the last chunk is padding with no weight).
  chunked = scoring.evaluate(model, texts, prefill_chunk=12, **kw)
  assert chunked[1] == plain[1] and math.isclose(plain[0], chunked[0], rel_tol=1e-5)
