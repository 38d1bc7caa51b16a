"""Inference core: cache layouts against the full forward, per-row sampling, compile counts."""

import collections
import dataclasses

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.inference import generate as gen
from jaxllm.inference import kv_cache, sampling, traces
from jaxllm.model import cache as model_cache
from jaxllm.model import transformer
from tests.helpers import tiny_model


def test_page_allocator_counts_references():
  alloc = kv_cache.PageAllocator(4)
  a = alloc.allocate(3)
  assert sorted(a) == [0, 1, 2] and alloc.num_free == 1
  with pytest.raises(kv_cache.OutOfPages, match="need 2 pages, 1 of 4 free"):
    alloc.allocate(2)
  assert alloc.num_free == 1  # a failed allocation takes nothing
  alloc.retain(a[:2])  # a second sequence shares two full prefix pages
  alloc.release(a)
  assert alloc.num_free == 2 and alloc.refcount(a[0]) == 1
  alloc.release(a[:2])
  assert alloc.num_free == 4
  with pytest.raises(ValueError, match="released more often than held"):
    alloc.release([a[0]])
  with pytest.raises(ValueError, match="only held pages can be shared"):
    alloc.retain([a[0]])


def test_writes_store_only_the_real_tokens():
  new = jnp.arange(1, 2 * 3 + 1, dtype=jnp.float32).reshape(2, 3, 1, 1)
  starts, num_new = jnp.array([0, 6]), jnp.array([3, 1])
  got = kv_cache.write(jnp.zeros((2, 2, 8, 1, 1)), 1, new, starts, num_new)[..., 0, 0]
  np.testing.assert_array_equal(got[0], 0)  # other layers untouched
  np.testing.assert_array_equal(got[1], [[1, 2, 3, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 4, 0]])
  # Near the end nothing is clamped back onto earlier slots.
  got = kv_cache.write(jnp.zeros((1, 2, 8, 1, 1)), 0, new, jnp.array([6, 7]))[0, ..., 0, 0]
  np.testing.assert_array_equal(got, [[0] * 6 + [1, 2], [0] * 7 + [4]])
  table = jnp.array([[2, 0], [1, 3]])  # page size 4
  pages = kv_cache.write_paged(jnp.zeros((2, 4, 4, 1, 1)), 0, new, table, jnp.array([2, 3]),
                               num_new)[..., 0, 0]
  want = np.zeros((4, 4))
  want[2, 2:4] = [1, 2]
  want[0, 0] = 3
  want[1, 3] = 4
  np.testing.assert_array_equal(pages[0], want)
  np.testing.assert_array_equal(pages[1], 0)
  # Read back through the table, each row's pages are one contiguous view (int8 too).
  view = [[0, 0, 1, 2, 3, 0, 0, 0], [0, 0, 0, 4, 0, 0, 0, 0]]
  full = kv_cache.write_paged(jnp.zeros((2, 4, 4, 1, 1)), 1, new, table, jnp.array([2, 3]),
                              num_new)
  np.testing.assert_array_equal(model_cache.read_paged(full, 1, table, jnp.float32)[..., 0, 0],
                                view)
  int8 = kv_cache.Int8KV(jnp.zeros((2, 4, 4, 1, 1), jnp.int8), jnp.ones((2, 4, 4, 1)))
  int8 = kv_cache.write_paged(int8, 1, new, table, jnp.array([2, 3]), num_new)
  np.testing.assert_allclose(model_cache.read_paged(int8, 1, table, jnp.float32)[..., 0, 0], view,
                             rtol=1e-6)


def _teacher_forced_logits(graphdef, params, prompts, continuation, kind, *, chunk,
                           page_size=4):
  """Prefill each prompt, then feed `continuation` one token per step -> `[steps + 1, B, V]`."""
  cfg = gen.model_config(graphdef, params)
  steps = continuation.shape[1]
  max_len = gen.bucket(max(len(p) for p in prompts) + steps + chunk)
  cache = gen.new_cache(cfg, kind, [len(p) + steps for p in prompts], max_len=max_len,
                        page_size=page_size, longest_step=chunk)
  if kind == "contiguous" and cfg.sliding_window:  # a ring of window + chunk - 1 slots, bucketed
    assert cache.k.shape[2] == gen.bucket(cfg.sliding_window + chunk - 1) < max_len
  last, cache = gen.prefill(graphdef, params, prompts, cache, prefill_chunk=chunk,
                            vocab_size=cfg.vocab_size)
  out = [last]
  for t in range(steps):
    last, cache = gen.decode_step(graphdef, params, jnp.asarray(continuation[:, t]), cache)
    out.append(last)
  return np.stack(jax.device_get(out))


def _full_forward_logits(graphdef, params, prompts, continuation):
  """The same positions from one uncached forward pass over each whole sequence."""
  steps = continuation.shape[1]
  seqs = [list(p) + list(c) for p, c in zip(prompts, continuation.tolist())]
  T = max(len(s) for s in seqs)
  ids = np.zeros((len(seqs), T), np.int32)
  for b, s in enumerate(seqs):
    ids[b, :len(s)] = s
  logits = np.asarray(nnx.merge(graphdef, params)(jnp.asarray(ids)))
  return np.stack([[logits[b, len(p) - 1 + t] for b, p in enumerate(prompts)]
                   for t in range(steps + 1)])


@pytest.mark.parametrize("overrides", [
    {}, dict(n_kv_heads=1), dict(sliding_window=5),
    dict(position_encoding="alibi", n_heads=6, n_kv_heads=2, sliding_window=9),
    dict(rope_scaling="yarn", rope_scaling_factor=4.0, rope_original_max_len=8)],
    ids=["gqa2", "mqa", "window5", "alibi_window9", "yarn"])
def test_cache_layouts_equal_the_full_forward_at_every_step(overrides):
  cfg = tiny_model(init_std=0.3, **overrides)
  graphdef, params = transformer.split(transformer.create(cfg, 1))
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, 64, n).tolist() for n in (1, 7, 13, 4)]
  continuation = rng.integers(0, 64, (4, 6))
  want = _full_forward_logits(graphdef, params, prompts, continuation)
  for kind in gen.CACHE_KINDS:
    got = _teacher_forced_logits(graphdef, params, prompts, continuation, kind, chunk=4)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=kind)


@pytest.mark.parametrize("position_encoding", ["rope", "alibi"])
def test_paged_cache_through_the_pallas_kernel(position_encoding):
  """attention_impl=pallas sends the paged cache through our kernel (interpreted on CPU),
  which reads each layer's pages from the flattened `[L * N, ...]` pool."""
  cfg = tiny_model(head_dim=64, n_heads=2, n_kv_heads=1, init_std=0.3, attention_impl="pallas",
                   position_encoding=position_encoding)
  graphdef, params = transformer.split(transformer.create(cfg, 4))
  xla_graphdef, _ = transformer.abstract_params(dataclasses.replace(cfg, attention_impl="xla"))
  rng = np.random.default_rng(2)
  prompts = [rng.integers(0, 64, n).tolist() for n in (3, 20)]
  continuation = rng.integers(0, 64, (2, 2))
  want = _full_forward_logits(xla_graphdef, params, prompts, continuation)
  got = _teacher_forced_logits(graphdef, params, prompts, continuation, "paged", chunk=8,
                               page_size=16)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_compiled_shapes_are_bounded():
  cfg = tiny_model()
  graphdef, params = transformer.split(transformer.create(cfg, 2))
  rng = np.random.default_rng(1)
  before = collections.Counter(traces.trace_counts())
  shapes = collections.defaultdict(set)
  for _ in range(12):
    lengths = rng.integers(1, 60, size=3)
    max_tokens = int(rng.integers(1, 12))
    prompts = [rng.integers(0, 64, n).tolist() for n in lengths]
    gen.generate_requests(graphdef, params, prompts,
                          [sampling.SamplingParams(max_tokens=max_tokens)] * 3,
                          prefill_chunk=16)
    chunk = gen.chunk_size(int(lengths.max()), 16)
    S = gen.bucket(-(-int(lengths.max()) // chunk) * chunk + max_tokens)
    shapes["extend_chunk"].add((chunk, S))
    shapes["decode_loop"].add((S, gen.bucket(max_tokens)))
  traced = collections.Counter(traces.trace_counts()) - before
  # 12 calls with 12 different prompt sets compile once per distinct bucketed shape, no more.
  assert traced["extend_chunk"] == len(shapes["extend_chunk"]) <= 4
  assert traced["decode_loop"] == len(shapes["decode_loop"]) <= 4


def _kept(logits_BV):
  return np.asarray(logits_BV) > -1e29


def test_filters_take_per_row_settings():
  probs = np.array([0.4, 0.3, 0.2, 0.06, 0.04])
  logits = jnp.log(jnp.asarray(probs, jnp.float32))[None].repeat(4, 0)
  params = [sampling.SamplingParams(temperature=1.0, top_k=2),
            sampling.SamplingParams(temperature=1.0, top_p=0.65),
            sampling.SamplingParams(temperature=1.0, min_p=0.5),
            # top-p counts mass within the top-k (0.9 / 0.96 < 0.95 keeps the 0.06 token);
            # min-p then drops it (0.06 < 0.2 * 0.4).
            sampling.SamplingParams(temperature=1.0, top_k=4, top_p=0.95, min_p=0.2)]
  kept = _kept(sampling.process(logits, sampling.SamplingArrays.of(params)))
  np.testing.assert_array_equal(kept, [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0],
                                       [1, 1, 1, 0, 0]])
  # Temperature scales the logits before the filters (and 0 leaves them for argmax).
  t = sampling.SamplingArrays.of([sampling.SamplingParams(temperature=0.5),
                                  sampling.SamplingParams(temperature=0.0)])
  got = np.asarray(sampling.process(logits[:2], t))
  np.testing.assert_allclose(got, np.log(probs)[None] * [[2.0], [1.0]], rtol=1e-6)


def test_penalties_match_their_definitions():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(2, 6)).astype(np.float32)
  counts = np.array([[0, 2, 0, 1, 0, 0], [3, 0, 0, 0, 0, 1]], np.int32)
  prompt = np.array([[1, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]], bool)
  params = [sampling.SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5),
            sampling.SamplingParams(presence_penalty=0.7, repetition_penalty=0.8)]
  got = np.asarray(sampling.apply_penalties(jnp.asarray(logits), sampling.SamplingArrays.of(params),
                                            jnp.asarray(counts), jnp.asarray(prompt)))
  want = logits.copy()
  for b, (rp, fp, pp) in enumerate([(1.3, 0.5, 0.0), (0.8, 0.0, 0.7)]):
    for v in range(6):
      if prompt[b, v] or counts[b, v]:
        want[b, v] = want[b, v] / rp if want[b, v] > 0 else want[b, v] * rp
      want[b, v] -= fp * counts[b, v] + pp * (counts[b, v] > 0)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_invalid_sampling_params_say_what_is_wrong():
  for kwargs, message in [(dict(temperature=-1), "temperature=-1 must be >= 0"),
                          (dict(top_p=0.0), "top_p=0.0 must be in"),
                          (dict(max_tokens=0), "max_tokens=0 must be in \\[1, 2\\*\\*31\\)"),
                          (dict(top_k=2 ** 31), "top_k=2147483648 must be in \\[0, 2\\*\\*31\\)"),
                          (dict(repetition_penalty=0), "repetition_penalty=0 must be > 0"),
                          (dict(stop=("",)), "stop strings must be non-empty")]:
    with pytest.raises(ValueError, match=message):
      sampling.SamplingParams(**kwargs)


def test_seed_key_is_prng_key():
  for seed in (0, 7, 2 ** 32 - 1):
    np.testing.assert_array_equal(sampling.seed_key(seed), np.asarray(jax.random.PRNGKey(seed)))
  # 64-bit seeds keep their high half (PRNGKey drops it without jax_enable_x64).
  assert not np.array_equal(sampling.seed_key(2 ** 32 + 5), sampling.seed_key(5))


@pytest.fixture(scope="module")
def sharp_model():
  """A random tiny model with peaked, varied next-token distributions."""
  return transformer.split(transformer.create(tiny_model(n_layers=3, init_std=0.4), 3))


def test_each_row_samples_as_if_alone(sharp_model):
  graphdef, params = sharp_model
  prompts = [[5, 9, 2], [7, 1, 8, 8, 3, 10, 11], [4], [1, 2, 3, 1, 2]]
  requests = [sampling.SamplingParams(temperature=0.0, max_tokens=9),
              sampling.SamplingParams(temperature=1.0, top_k=5, seed=11, max_tokens=12),
              sampling.SamplingParams(temperature=0.7, top_p=0.8, min_p=0.05, seed=3,
                                      max_tokens=6, repetition_penalty=1.2),
              sampling.SamplingParams(temperature=1.3, seed=11, frequency_penalty=0.8,
                                      presence_penalty=0.3, max_tokens=10)]
  batched = gen.generate_requests(graphdef, params, prompts, requests)
  for kind in gen.CACHE_KINDS:
    for b in range(len(prompts)):
      alone = gen.generate_requests(graphdef, params, [prompts[b]], [requests[b]], cache=kind)[0]
      assert alone.tokens == batched[b].tokens, (kind, b)
      np.testing.assert_allclose(alone.logprobs, batched[b].logprobs, atol=1e-5)
  assert [len(r.tokens) for r in batched] == [9, 12, 6, 10]
  assert {r.finish_reason for r in batched} == {"length"}
  # Same seed, same output in another batch position; another seed, another output.
  swapped = gen.generate_requests(graphdef, params, prompts[::-1], requests[::-1])
  assert [r.tokens for r in swapped] == [r.tokens for r in batched[::-1]]
  reseeded = gen.generate_requests(
      graphdef, params, prompts[1:2],
      [sampling.SamplingParams(temperature=1.0, top_k=5, seed=12, max_tokens=12)])
  assert reseeded[0].tokens != batched[1].tokens


def test_logprobs_are_the_models_and_stop_tokens_end_a_request(sharp_model):
  graphdef, params = sharp_model
  prompt = [3, 14, 15, 9, 2, 6]
  free = gen.generate_requests(graphdef, params, [prompt], [
      sampling.SamplingParams(temperature=1.0, seed=5, max_tokens=16)])[0]
  logits = nnx.merge(graphdef, params)(jnp.asarray([prompt + free.tokens]))[0]
  logp = jax.nn.log_softmax(logits[len(prompt) - 1:-1], axis=-1)
  want = np.asarray(jnp.take_along_axis(logp, jnp.asarray(free.tokens)[:, None], 1)[:, 0])
  np.testing.assert_allclose(free.logprobs, want, atol=1e-5)
  stop_at = 6
  stop = free.tokens[stop_at]
  first = free.tokens.index(stop)
  cut = gen.generate_requests(graphdef, params, [prompt], [
      sampling.SamplingParams(temperature=1.0, seed=5, max_tokens=16, stop_token_ids=(stop,))])[0]
  assert cut.tokens == free.tokens[:first] and cut.finish_reason == "stop"
  eos = gen.generate_requests(graphdef, params, [prompt], [
      sampling.SamplingParams(temperature=1.0, seed=5, max_tokens=16)], eos_id=stop)[0]
  assert eos.tokens == cut.tokens and eos.finish_reason == "stop"


def test_stop_strings_cut_text_and_tokens():
  decode = lambda ids: "".join(chr(ord("a") + i) for i in ids)
  ids, text, stopped = sampling.apply_stop_strings([0, 1, 2, 3, 4], ["cd", "zz"], decode)
  assert (ids, text, stopped) == ([0, 1, 2], "ab", True)
  assert sampling.apply_stop_strings([0, 1], ["x"], decode) == ([0, 1], "ab", False)


def test_prompts_are_checked(sharp_model):
  graphdef, params = sharp_model
  sp = [sampling.SamplingParams(max_tokens=4)]
  with pytest.raises(ValueError, match="at least one token"):
    gen.generate_requests(graphdef, params, [[]], sp)
  with pytest.raises(ValueError, match=r"token ids outside \[0, 64\)"):
    gen.generate_requests(graphdef, params, [[1, 64]], sp)
  with pytest.raises(ValueError, match="cache='ring'"):
    gen.generate_requests(graphdef, params, [[1]], sp, cache="ring")


@pytest.fixture(scope="module")
def smollm2():
  import jaxllm
  from jaxllm.fetch import fetch
  return jaxllm.load(fetch("smollm2-135m"))


def test_smollm2_cache_layouts_equal_recompute_at_every_step(smollm2):
  """Real weights (fp32): prompts of three lengths, chunked prefill, 6 decode steps."""
  m = smollm2
  texts = ["def fibonacci(n):", "The capital of France is Paris. The capital of Italy is",
           "import numpy as np\n\nclass Model:\n    def __init__(self, layers):\n        self."]
  prompts = [m.prompt_ids(t) for t in texts]
  assert sorted(len(p) for p in prompts)[0] < 16 < sorted(len(p) for p in prompts)[-1]
  continuation = np.asarray([m.tokenizer.encode(" return the value of the function")[:6]] * 3)
  assert continuation.shape == (3, 6)
  want = _full_forward_logits(m.graphdef, m.params, prompts, continuation)
  for kind in gen.CACHE_KINDS:
    got = _teacher_forced_logits(m.graphdef, m.params, prompts, continuation, kind, chunk=16,
                                 page_size=16)
    # float32 reduction order over 30 layers (logits up to ~20): 6.5e-5 on one CPU, 1.0e-4 on
    # another of the same machine kind (2026-11-30), for the unchanged code.
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=0, err_msg=kind)
