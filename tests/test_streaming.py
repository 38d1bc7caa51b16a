"""StreamingLLM generation (attention sinks + a recent window, positions within the cache)
against a float64 numpy decoder that keeps every token's K/V and attends to the kept ones."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxllm.inference import generate as gen
from jaxllm.inference import sampling
from jaxllm.model import cache as kv_cache
from jaxllm.model import positions, transformer
from tests.helpers import tiny_model

SINKS, WINDOW = 2, 6


def _reference_logits(cfg, params, seq, sinks, window):
  """Token-by-token float64 decoding: query p attends to tokens 0..sinks-1 and the `window`
  latest (itself included), at positions 0..n-1 in that order (StreamingLLM)."""
  P = jax.tree.map(lambda a: np.asarray(a, np.float64), jax.device_get(params))
  inv_freq = positions.rope_inverse_frequencies(cfg.head_dim, cfg.rope_theta).astype(np.float64)
  slopes = positions.alibi_slopes(cfg.n_heads).astype(np.float64)
  G = cfg.n_heads // cfg.n_kv_heads

  def rms(x, scale):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.norm_eps) * scale

  def rope(x_NDh, pos):
    if cfg.position_encoding != "rope":
      return x_NDh
    a = pos * inv_freq
    x1, x2 = np.split(x_NDh, 2, axis=-1)
    return np.concatenate([x1 * np.cos(a) - x2 * np.sin(a), x2 * np.cos(a) + x1 * np.sin(a)], -1)

  keys = [[] for _ in range(cfg.n_layers)]  # raw (unrotated) K and V of every token, per layer
  values = [[] for _ in range(cfg.n_layers)]
  out = []
  for p, tok in enumerate(seq):
    kept = list(range(min(sinks, p + 1))) + list(range(max(sinks, p - window + 1), p + 1))
    h = P["embed"][tok]
    for layer in range(cfg.n_layers):
      blk = jax.tree.map(lambda a, i=layer: a[i], P["blocks"])
      x = rms(h, blk["attn_norm"]["scale"])
      q = np.einsum("d,dhk->hk", x, blk["attn"]["q"])
      keys[layer].append(np.einsum("d,dhk->hk", x, blk["attn"]["k"]))
      values[layer].append(np.einsum("d,dhk->hk", x, blk["attn"]["v"]))
      n = len(kept)
      q = rope(q, n - 1)
      k = np.stack([rope(keys[layer][j], i) for i, j in enumerate(kept)])  # [n, K, Dh]
      v = np.stack([values[layer][j] for j in kept])
      s = np.einsum("hd,nhd->hn", q, np.repeat(k, G, axis=1)) / np.sqrt(cfg.head_dim)
      if cfg.position_encoding == "alibi":
        s -= slopes[:, None] * (n - 1 - np.arange(n))[None, :]
      w = np.exp(s - s.max(-1, keepdims=True))
      w /= w.sum(-1, keepdims=True)
      h = h + np.einsum("hd,hdk->k", np.einsum("hn,nhd->hd", w, np.repeat(v, G, axis=1)),
                        blk["attn"]["o"])
      x = rms(h, blk["mlp_norm"]["scale"])
      gate, up = x @ blk["mlp"]["gate"], x @ blk["mlp"]["up"]
      h = h + (gate / (1 + np.exp(-gate)) * up) @ blk["mlp"]["down"]
    out.append(rms(h, P["final_norm"]["scale"]) @ P["embed"].T)
  return np.stack(out)


@pytest.mark.parametrize("position_encoding", ["rope", "alibi"])
def test_streaming_cache_equals_the_reference_at_every_step(position_encoding):
  """40 tokens through an 11-slot cache: chunked prefill while nothing is evicted, then one
  token per step, and a prefill that evicts as it goes (chunk 1)."""
  cfg = tiny_model(init_std=0.3, position_encoding=position_encoding)
  graphdef, params = transformer.split(transformer.create(cfg, 1))
  stream = kv_cache.Stream(SINKS, WINDOW)
  seq = np.random.default_rng(0).integers(0, 64, 40)
  want = _reference_logits(cfg, params, seq, SINKS, WINDOW)
  for prompt_len, chunk in ((5, 4), (20, 1)):
    cache = gen.new_cache(cfg, "contiguous", [40], max_len=stream.cache_len(chunk))
    assert cache.k.shape[2] == SINKS + WINDOW + chunk - 1
    last, cache = gen.prefill(graphdef, params, [seq[:prompt_len].tolist()], cache,
                              prefill_chunk=chunk, vocab_size=cfg.vocab_size, stream=stream)
    got = [last[0]]
    for p in range(prompt_len, 39):
      last, cache = gen.decode_step(graphdef, params, jnp.asarray(seq[p:p + 1]), cache,
                                    stream=stream)
      got.append(last[0])
    np.testing.assert_allclose(np.stack(jax.device_get(got)), want[prompt_len - 1:39],
                               atol=1e-4, err_msg=f"prompt {prompt_len}, chunk {chunk}")


def test_streaming_generates_far_past_the_context_in_constant_memory():
  """A 32-token model generates 4x its context through a 12-slot cache; greedy output equals
  the reference decoder's, and a too-large window is refused in one line."""
  cfg = tiny_model(init_std=0.3, max_seq_len=32)
  graphdef, params = transformer.split(transformer.create(cfg, 2))
  prompt = np.random.default_rng(1).integers(0, 64, 9).tolist()
  stream = kv_cache.Stream(4, 8)
  sp = sampling.SamplingParams(max_tokens=128)
  with pytest.raises(ValueError, match="exceeds the model's max_seq_len 32"):
    gen.generate_requests(graphdef, params, [prompt], [sp], max_seq_len=32)
  (got,) = gen.generate_requests(graphdef, params, [prompt], [sp], max_seq_len=32,
                                 stream=stream, prefill_chunk=1)
  assert len(got.tokens) == 128
  logits = _reference_logits(cfg, params, prompt + got.tokens[:-1], 4, 8)
  assert got.tokens == np.argmax(logits[len(prompt) - 1:], axis=-1).tolist()
  with pytest.raises(ValueError, match="sink_tokens \\+ stream_window = 40 exceeds"):
    gen.generate_requests(graphdef, params, [prompt], [sp], max_seq_len=32,
                          stream=kv_cache.Stream(8, 32))
  with pytest.raises(ValueError, match="needs the contiguous cache"):
    gen.generate_requests(graphdef, params, [prompt], [sp], max_seq_len=32, stream=stream,
                          cache="paged")


def test_engine_streams_past_the_context_in_constant_pages():
  """The continuous-batching engine streams two requests 3x past a 32-token context, each in
  the same 4 pages of 4 tokens (a pool of 8 could not hold one 105-token sequence), greedy
  output equal to the reference decoder's; bad streaming settings are refused in one line."""
  from jaxllm.inference import engine as engine_lib
  cfg = tiny_model(init_std=0.3, max_seq_len=32)
  graphdef, params = transformer.split(transformer.create(cfg, 2))
  rng = np.random.default_rng(3)
  prompts = [rng.integers(0, 64, 9).tolist(), rng.integers(0, 64, 3).tolist()]
  config = engine_lib.EngineConfig(max_slots=2, num_pages=8, page_size=4, prefill_chunk=4,
                                   sink_tokens=4, stream_window=8)
  engine = engine_lib.Engine(graphdef, params, config)
  assert engine.max_pages == 4  # 4 sinks + a ring of 8 + 4 - 1 slots
  requests = [engine.submit(p, sampling.SamplingParams(max_tokens=96)) for p in prompts]
  in_use = []
  while not engine.idle:
    engine.step()
    in_use.append(engine.allocator.num_pages - engine.allocator.num_free)
  assert max(in_use) == 8 and in_use[-1] == 0
  for prompt, r in zip(prompts, requests):
    assert len(r.tokens) == 96 and r.finish_reason == "length"
    logits = _reference_logits(cfg, params, prompt + r.tokens[:-1], 4, 8)
    assert r.tokens == np.argmax(logits[len(prompt) - 1:], axis=-1).tolist()
  for bad, match in ((dict(sink_tokens=4), "sink_tokens needs a stream_window"),
                     (dict(stream_window=8, speculative_k=2), "speculative decoding cannot"),
                     (dict(sink_tokens=4, stream_window=8, num_pages=3),
                      "cannot hold one streaming sequence"),
                     (dict(sink_tokens=8, stream_window=32), "exceeds the model's max_seq_len")):
    with pytest.raises(ValueError, match=match):
      engine_lib.Engine(graphdef, params, engine_lib.EngineConfig(
          **{**dict(page_size=4, prefill_chunk=4), **bad}))


def test_passkey_prompts_hide_the_key_at_the_depth_asked():
  from jaxllm.bench import passkey
  encode = lambda text: [ord(c) for c in text]  # one token per character
  for depth in (0.0, 0.5, 1.0):
    ids = passkey.prompt_ids(encode, 4000, 12345, depth)
    text = "".join(map(chr, ids))
    assert 3900 <= len(ids) <= 4000 and text.endswith(passkey.QUESTION)
    at = text.index("The pass key is 12345") / len(text)
    assert abs(at - depth) < 0.05, (depth, at)
  result = {"trials": 1, "context": 8, "rows": [
      {"scaling": s, "length": L, "correct": c}
      for s, L, c in (("none", 8, True), ("none", 16, False), ("yarn:2", 8, True),
                      ("yarn:2", 16, True))]}
  assert "| none | 1/1 | 0/1 |" in passkey.table(result)
  assert "| yarn:2 | 1/1 | 1/1 |" in passkey.table(result)
