"""Speculative decoding: greedy equals target decoding; sampling keeps the target distribution."""

import itertools

import numpy as np
import pytest
from scipy import stats

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.inference import generate as gen
from jaxllm.inference import sampling
from jaxllm.inference import speculative as spec
from jaxllm.model import transformer
from tests.helpers import tiny_model

PROMPTS = [[5, 9, 2, 33], [7, 1, 8, 8, 3, 10, 11, 40, 2, 6, 1, 1, 9, 20, 4, 17, 3],
           [1, 2, 3, 1, 2, 3, 1, 2]]


@pytest.fixture(scope="module")
def target():
  return transformer.split(transformer.create(tiny_model(n_layers=4, init_std=0.4), 3))


def _noisy_copy(params, scale, seed=1):
  """The target with small weight noise: a draft that agrees about half the time."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape)
                                   for x, k in zip(leaves, keys)])


def _drafts(graphdef, params):
  small = transformer.split(transformer.create(
      tiny_model(n_layers=1, d_model=16, n_heads=2, n_kv_heads=1, init_std=0.4), 5))
  return {"noisy_copy": spec.model_draft(graphdef, _noisy_copy(params, 0.005)),
          "small_model": spec.model_draft(*small),
          "layer_skip": spec.layer_skip_draft(graphdef, params, 2),
          "ngram": spec.ngram_draft(3)}


def test_greedy_speculation_reproduces_greedy_decoding(target):
  graphdef, params = target
  requests = [sampling.SamplingParams(max_tokens=m) for m in (12, 20, 7)]
  want = gen.generate_requests(graphdef, params, PROMPTS, requests)
  rates = {}
  # k at both ends of 1..8 and between (odd: paged, even: contiguous; powers of two and not)
  # for a model draft. A smaller model and the target's first layers are model drafts too (the
  # same k-dependent code, another draft graph): one k each; the n-gram lookup (its own
  # proposals) at both ends. A compile per (source, k): 8.
  ks = {"noisy_copy": (1, 2, 5, 8), "small_model": (3,), "layer_skip": (4,), "ngram": (1, 8)}
  for name, draft in _drafts(graphdef, params).items():
    for k in ks[name]:
      cache = "paged" if k % 2 else "contiguous"
      got, st = spec.speculative_generate(graphdef, params, PROMPTS, requests, draft, k=k,
                                          cache=cache)
      for g, w in zip(got, want):
        assert g.tokens == w.tokens, (name, k)
        assert g.finish_reason == w.finish_reason
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-5)
      rates[name, k] = st.acceptance_rate
  # The noisy copy accepts some and rejects some: both branches (and the all-accepted catch-up
  # of the draft cache) ran.
  assert all(0.1 < rates["noisy_copy", k] < 0.95 for k in ks["noisy_copy"]), rates


def test_windowed_models_speculate_through_ring_caches():
  """A sliding-window target and draft keep ring-buffer caches of window + k slots; rejected
  proposals overwrite the oldest slots and must not cost the window a key. Against paged
  greedy decoding (no ring). Window 8 and k = 8: exactly 16 slots, no slack from bucketing."""
  graphdef, params = transformer.split(transformer.create(
      tiny_model(n_layers=2, init_std=0.4, sliding_window=8), 3))
  requests = [sampling.SamplingParams(max_tokens=m) for m in (12, 20, 7)]
  want = gen.generate_requests(graphdef, params, PROMPTS, requests, cache="paged")
  draft = spec.model_draft(graphdef, _noisy_copy(params, 0.005))
  for k in (3, 8):
    got, st = spec.speculative_generate(graphdef, params, PROMPTS, requests, draft, k=k,
                                        cache="contiguous")
    assert [g.tokens for g in got] == [w.tokens for w in want], k
    assert 0 < st.acceptance_rate < 1


def test_stop_tokens_and_max_tokens_cut_speculative_output(target):
  graphdef, params = target
  free = gen.generate_requests(graphdef, params, PROMPTS[1:2],
                               [sampling.SamplingParams(max_tokens=20)])[0].tokens
  stop = free[9]
  requests = [sampling.SamplingParams(max_tokens=20, stop_token_ids=(stop,)),
              sampling.SamplingParams(max_tokens=5)]
  draft = spec.model_draft(graphdef, params)  # accepts everything: cuts fall mid-block
  got, _ = spec.speculative_generate(graphdef, params, PROMPTS[1:2] * 2, requests, draft, k=4)
  assert got[0].tokens == free[:free.index(stop)] and got[0].finish_reason == "stop"
  assert got[1].tokens == free[:5] and got[1].finish_reason == "length"


def test_speculative_input_is_checked(target):
  graphdef, params = target
  sp = [sampling.SamplingParams(max_tokens=4)]
  other = transformer.split(transformer.create(tiny_model(vocab_size=80), 0))
  with pytest.raises(ValueError, match="draft vocabulary 80 differs from the target's 64"):
    spec.speculative_generate(graphdef, params, [[1]], sp, spec.model_draft(*other))
  with pytest.raises(ValueError, match="penalties"):
    spec.speculative_generate(graphdef, params, [[1]], [sampling.SamplingParams(
        repetition_penalty=1.1)], spec.ngram_draft())
  with pytest.raises(ValueError, match="k=0"):
    spec.speculative_generate(graphdef, params, [[1]], sp, spec.ngram_draft(), k=0)
  with pytest.raises(ValueError, match=r"layers=4 must be in \[1, 4\)"):
    spec.layer_skip_draft(graphdef, params, 4)


def _next_token_probs(graphdef, params, prefixes, arrays1):
  """Target (processed) next-token probabilities after each prefix, `[len(prefixes), V]`."""
  ids = jnp.asarray(prefixes, jnp.int32)
  logits = nnx.merge(graphdef, params)(ids)[:, -1]
  arrays = jax.tree.map(lambda a: jnp.repeat(a, len(prefixes), axis=0), arrays1)
  return np.asarray(sampling.probabilities(logits, arrays), np.float64)


def _chi2_pvalue(samples, probs):
  counts = np.bincount(samples, minlength=len(probs)).astype(np.float64)
  expected = probs * len(samples)
  assert counts[expected == 0].sum() == 0, "sampled a token the target gives probability 0"
  big = expected >= 5  # pool the rare tokens into one bin
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(expected[big], expected[~big].sum())
  if exp[-1] == 0:
    obs, exp = obs[:-1], exp[:-1]
  return stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.8, 6)])
def test_speculative_sampling_keeps_the_target_distribution(temperature, top_k):
  V, N, prompt = 12, 4000, [1, 2, 3]
  graphdef, params = transformer.split(transformer.create(
      tiny_model(vocab_size=V, n_layers=2, init_std=0.15), 7))
  draft_model = transformer.split(transformer.create(
      tiny_model(vocab_size=V, n_layers=1, init_std=0.15), 8))
  make = lambda seed, m: sampling.SamplingParams(temperature=temperature, top_k=top_k,
                                                 seed=seed, max_tokens=m)
  arrays1 = sampling.SamplingArrays.of([make(0, 1)])
  # Exact marginals of tokens 2 and 3 by enumerating the earlier tokens.
  p1 = _next_token_probs(graphdef, params, [prompt], arrays1)[0]
  p2_given = _next_token_probs(graphdef, params, [prompt + [a] for a in range(V)], arrays1)
  pairs = list(itertools.product(range(V), repeat=2))
  p3_given = _next_token_probs(graphdef, params, [prompt + list(ab) for ab in pairs], arrays1)
  p2 = p1 @ p2_given
  p3 = sum(p1[a] * p2_given[a, b] * p3_given[i] for i, (a, b) in enumerate(pairs))

  got, st = spec.speculative_generate(graphdef, params, [prompt] * N,
                                      [make(s, 3) for s in range(N)],
                                      spec.model_draft(*draft_model), k=2)
  toks = np.array([g.tokens for g in got])
  assert toks.shape == (N, 3)
  assert _chi2_pvalue(toks[:, 0], p1) > 1e-3
  assert _chi2_pvalue(toks[:, 1], p2) > 1e-3
  assert _chi2_pvalue(toks[:, 2], p3) > 1e-3
  assert 0.3 < st.acceptance_rate < 0.95

  # Acceptance of one proposal: E over the first token of sum_x min(p(x), q(x)).
  q2_given = _next_token_probs(*draft_model, [prompt + [a] for a in range(V)], arrays1)
  expected = float(p1 @ np.minimum(p2_given, q2_given).sum(axis=1))
  _, st1 = spec.speculative_generate(graphdef, params, [prompt] * N,
                                     [make(s + N, 2) for s in range(N)],
                                     spec.model_draft(*draft_model), k=1)
  assert st1.proposed == N
  stderr = np.sqrt(expected * (1 - expected) / N)
  assert abs(st1.acceptance_rate - expected) < 4 * stderr, (st1.acceptance_rate, expected)
