"""Continuous batching: every request's output equals running it alone, whatever the traffic."""

import threading

import numpy as np
import pytest

from jaxllm.inference import engine as engine_lib
from jaxllm.inference import generate as gen
from jaxllm.inference import sampling, traces
from jaxllm.model import transformer
from tests.helpers import tiny_model


@pytest.fixture(scope="module")
def model():
  return transformer.split(transformer.create(tiny_model(n_layers=2, init_std=0.4), 3))


def _workload(n, seed=0, system=()):
  """n (prompt, params) pairs with lengths and settings drawn from a fixed seeded distribution."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    prompt = list(system) + rng.integers(0, 64, int(rng.integers(1, 40))).tolist()
    kind = i % 4
    params = sampling.SamplingParams(
        max_tokens=int(rng.integers(1, 25)), seed=int(rng.integers(0, 2 ** 31)),
        temperature=0.0 if kind == 0 else float(rng.choice([0.7, 1.0, 1.3])),
        top_k=8 if kind == 2 else 0, top_p=0.9 if kind == 3 else 1.0,
        repetition_penalty=1.3 if i % 5 == 0 else 1.0,
        stop_token_ids=(int(rng.integers(0, 64)),) if i % 3 == 0 else ())
    out.append((prompt, params))
  return out


def _alone(model, prompt, params, eos_id=-1):
  graphdef, weights = model
  return gen.generate_requests(graphdef, weights, [prompt], [params], eos_id=eos_id)[0]


def _check_equal_alone(model, requests):
  for r in requests:
    want = _alone(model, r.prompt, r.params)
    assert r.tokens == want.tokens, r.id
    assert r.finish_reason == want.finish_reason, r.id
    np.testing.assert_allclose(r.logprobs, want.logprobs, atol=1e-4)


def _all_pages_back(engine):
  engine.prefix_cache.evict(engine.allocator.num_pages)
  return engine.allocator.num_free == engine.allocator.num_pages


@pytest.mark.parametrize("mixed_steps", [False, True])
def test_mixed_workload_arriving_over_time_equals_each_request_alone(model, mixed_steps):
  """With mixed_steps, prompts arriving while others decode go through the decode steps
  (`steps.mixed`: their tokens as extra rows of the step), and nothing changes."""
  graphdef, weights = model
  # Overlapped (an accelerator's default; the CPU backend's is lockstep): tokens still in
  # flight while the next step is scheduled.
  engine = engine_lib.Engine(graphdef, weights, engine_lib.EngineConfig(
      max_slots=8, num_pages=96, page_size=8, prefill_chunk=16, mixed_steps=mixed_steps,
      overlap=True))
  assert engine.overlap
  work = _workload(64)
  before = dict(traces.trace_counts())  # other tests compile too: count this run's programs only
  rng = np.random.default_rng(1)
  arrivals = np.sort(rng.integers(0, 60, len(work)))  # engine step at which each arrives
  requests, step = [], 0
  while len(requests) < len(work) or not engine.idle:
    while len(requests) < len(work) and arrivals[len(requests)] <= step:
      requests.append(engine.submit(*work[len(requests)]))
    engine.step()
    step += 1
  assert all(r.done for r in requests)
  _check_equal_alone(model, requests)
  assert engine.stats["decode_steps"] < sum(len(r.tokens) + 1 for r in requests) / 3
  assert _all_pages_back(engine)
  # Fixed shapes: one program per page-table width (1, 2, 4, 8, 16 pages of 8 tokens for a
  # 128-token context), decode with and without penalties.
  built = {k: v - before.get(k, 0) for k, v in traces.trace_counts().items()}
  assert built["engine_prefill"] <= 5 and built["engine_decode"] <= 10
  if mixed_steps:  # most prompts arrived while others decoded
    assert engine.stats["mixed_steps"] > 20 and built["engine_mixed"] <= 10


@pytest.mark.parametrize("overlap,prefill_rows,mixed_steps",
                         [(True, 1, False), (False, 3, False), (True, 1, True)])
def test_preemption_in_a_tiny_pool_completes_every_request(model, overlap, prefill_rows,
                                                           mixed_steps):
  graphdef, weights = model
  # 8 pages of 8 tokens hold one full-length sequence; 12 requests compete for them (and
  # preempted ones are recomputed beside others prefilling, with prefill_rows 3).
  engine = engine_lib.Engine(graphdef, weights, engine_lib.EngineConfig(
      max_slots=4, num_pages=8, page_size=8, prefill_chunk=8, max_seq_len=64,
      overlap=overlap, prefill_rows=prefill_rows, mixed_steps=mixed_steps))
  work = [(p[:30], sampling.SamplingParams(**{**_params_dict(sp), "max_tokens": 30}))
          for p, sp in _workload(12, seed=2)]
  requests = engine_lib.generate_all(engine, *zip(*work))
  assert engine.stats["preemptions"] > 0
  _check_equal_alone(model, requests)
  assert _all_pages_back(engine)


def _params_dict(sp):
  return {f: getattr(sp, f) for f in sp.__dataclass_fields__}


def test_shared_prefix_pages_are_reused(model):
  graphdef, weights = model
  system = list(range(1, 41))  # a 40-token "system prompt": 5 full pages of 8
  engine = engine_lib.Engine(graphdef, weights, engine_lib.EngineConfig(
      max_slots=4, num_pages=64, page_size=8, prefill_chunk=16))
  work = _workload(8, seed=3, system=system)
  first = engine_lib.generate_all(engine, *zip(*work[:1]))
  rest = engine_lib.generate_all(engine, *zip(*work[1:]))
  assert engine.stats["prefix_hit_tokens"] == 7 * 40
  _check_equal_alone(model, first + rest)
  assert _all_pages_back(engine)


def test_prompts_arriving_together_compute_their_shared_prefix_once(model):
  """...with one request prefilling per step, or several (`prefill_rows`, an RL rollout's
  group): the same tokens, the shared pages computed once, in fewer steps."""
  graphdef, weights = model
  system = list(range(1, 41))
  steps = {}
  for rows in (1, 4):
    engine = engine_lib.Engine(graphdef, weights, engine_lib.EngineConfig(
        max_slots=4, num_pages=64, page_size=8, prefill_chunk=16, prefill_rows=rows))
    work = _workload(8, seed=5, system=system)
    requests = [engine.submit(*w) for w in work]
    steps[rows] = 0
    while not engine.idle:
      engine.step()
      steps[rows] += 1
    # The first admitted computes the 5 system pages; the rest wait for them, then share them.
    assert engine.stats["prefix_hit_tokens"] == 7 * 40
    assert engine.stats["prefill_tokens"] == sum(len(r.prompt) for r in requests) - 7 * 40
    _check_equal_alone(model, requests)
    assert _all_pages_back(engine)
  assert steps[4] < steps[1]


def test_decode_steps_are_dispatched_before_the_last_ones_tokens_are_read(model):
  """With overlap, after each step one decode step is still in flight: its token is fed (in
  the cache length) but not yet emitted; without it, every token is emitted within its step.
  Unset, overlap is off on the CPU backend (where host work would compete with the step)."""
  graphdef, weights = model
  assert not engine_lib.Engine(graphdef, weights, engine_lib.EngineConfig(num_pages=32)).overlap
  for overlap in (True, False):
    engine = engine_lib.Engine(graphdef, weights, engine_lib.EngineConfig(
        max_slots=2, num_pages=32, page_size=8, overlap=overlap))
    r = engine.submit([1, 2, 3], sampling.SamplingParams(max_tokens=6))
    for step in range(1, 4):
      engine.step()
      assert r.inflight == int(overlap)
      assert len(r.tokens) == step - int(overlap)
      assert r.prefilled == len(r.prompt) + step
    engine.run_until_idle()
    assert r.finish_reason == "length" and r.tokens == _alone(model, r.prompt, r.params).tokens
    assert engine.stats["decode_steps"] == 6  # none wasted past max_tokens
    assert engine.allocator.num_free + len(engine.prefix_cache) == engine.allocator.num_pages


def test_cancel_frees_the_pages(model):
  graphdef, weights = model
  engine = engine_lib.Engine(graphdef, weights, engine_lib.EngineConfig(
      max_slots=2, num_pages=32, page_size=8, prefix_caching=False))
  long = engine.submit([1, 2, 3], sampling.SamplingParams(max_tokens=60))
  waiting = [engine.submit([4], sampling.SamplingParams(max_tokens=60)) for _ in range(2)]
  for _ in range(5):
    engine.step()
  assert long.tokens and not long.done
  engine.cancel(long)
  engine.cancel(waiting[1])  # still queued
  engine.run_until_idle()
  assert long.finish_reason == "cancelled" and waiting[1].finish_reason == "cancelled"
  assert waiting[0].finish_reason == "length" and len(waiting[0].tokens) == 60
  assert engine.allocator.num_free == engine.allocator.num_pages


def test_concurrent_streaming_clients_lose_and_duplicate_nothing(model):
  graphdef, weights = model
  engine = engine_lib.Engine(graphdef, weights, engine_lib.EngineConfig(
      max_slots=8, num_pages=48, page_size=8, prefill_chunk=16))
  engine.start()
  work = _workload(64, seed=4)
  streamed = {}
  done = threading.Barrier(len(work) + 1)

  def client(i):
    prompt, params = work[i]
    finished = threading.Event()
    got = []
    r = engine.submit(prompt, params, on_token=lambda req, t: got.append(t),
                      on_finish=lambda req: finished.set())
    finished.wait(timeout=600)
    streamed[i] = (r, got)
    done.wait()

  threads = [threading.Thread(target=client, args=(i,)) for i in range(len(work))]
  for t in threads:
    t.start()
  done.wait(timeout=600)
  engine.shutdown()
  requests = [streamed[i][0] for i in range(len(work))]
  for r, got in streamed.values():
    assert got == r.tokens  # every token streamed once, in order
  _check_equal_alone(model, requests)
  assert _all_pages_back(engine)


def test_bad_requests_are_refused(model):
  graphdef, weights = model
  engine = engine_lib.Engine(graphdef, weights, engine_lib.EngineConfig(num_pages=16,
                                                                        page_size=8))
  with pytest.raises(ValueError, match="exceeds the context of 128 tokens"):
    engine.submit([1] * 120, sampling.SamplingParams(max_tokens=10))
  with pytest.raises(ValueError, match="at least one token"):
    engine.submit([], sampling.SamplingParams())
  with pytest.raises(ValueError, match="cannot hold one sequence"):
    engine_lib.Engine(graphdef, weights, engine_lib.EngineConfig(num_pages=4, page_size=8))


def test_window_pages_are_released_while_decoding(alibi_model):
  """A 24-token window over 8-token pages: each request holds at most the 4 pages its next
  query's window can touch (plus the one being filled), however long it runs, and decodes as
  if alone."""
  from jaxllm.inference import paging
  graphdef, weights = alibi_model
  engine = engine_lib.Engine(graphdef, weights, engine_lib.EngineConfig(
      max_slots=4, num_pages=64, page_size=8, prefill_chunk=16))
  held = []
  on_token = lambda r, t: held.append(sum(p != paging.RELEASED for p in r.pages))
  rng = np.random.default_rng(4)
  requests = [engine.submit(rng.integers(0, 64, 10).tolist(), sampling.SamplingParams(
      max_tokens=90, seed=i, temperature=0.8), on_token=on_token) for i in range(4)]
  engine.run_until_idle()
  _check_equal_alone(alibi_model, requests)
  assert max(held) <= 5 and engine.stats["window_pages_released"] >= 4 * 8
  assert _all_pages_back(engine)


def _repetitive_prompts(n, seed=0):
  """Prompts that repeat a short motif, so prompt lookup has something to propose."""
  rng = np.random.default_rng(seed)
  return [(rng.integers(0, 64, int(rng.integers(2, 6))).tolist() * 6)[:int(rng.integers(8, 30))]
          for _ in range(n)]


@pytest.fixture(scope="module")
def alibi_model():
  """ALiBi with 6 heads (slopes of a non-power-of-two head count) and a sliding window."""
  return transformer.split(transformer.create(tiny_model(
      n_layers=2, n_heads=6, n_kv_heads=2, init_std=0.4, position_encoding="alibi",
      sliding_window=24), 3))


@pytest.fixture(scope="module")
def gemma_model():
  """Gemma's block (sandwich (1 + w) norms, GeGLU, soft caps) with a local layer (window 24)
  then a global one: the global layer keeps every page."""
  return transformer.split(transformer.create(tiny_model(
      n_layers=2, init_std=0.4, norm_placement="sandwich", norm_offset=1.0, embed_scale=True,
      mlp_activation="gelu_tanh", global_every=2, sliding_window=24, rope_local_theta=100.0,
      attn_logit_soft_cap=3.0, final_logit_soft_cap=8.0), 3))


@pytest.mark.parametrize("which", ["model", "alibi_model", "gemma_model"])
def test_speculative_engine_greedy_equals_each_request_alone(which, request):
  """Chunked prefill, paged decode and speculative verification in the engine (ALiBi and
  Gemma's local and global layers too)."""
  model = request.getfixturevalue(which)
  graphdef, weights = model
  engine = engine_lib.Engine(graphdef, weights, engine_lib.EngineConfig(
      max_slots=4, num_pages=64, page_size=8, prefill_chunk=16, speculative_k=4))
  params = [sampling.SamplingParams(max_tokens=int(m), stop_token_ids=(5,) if i % 3 else ())
            for i, m in enumerate(np.random.default_rng(2).integers(1, 30, 12))]
  requests = engine_lib.generate_all(engine, _repetitive_prompts(12), params)
  _check_equal_alone(model, requests)
  assert engine.stats["speculative_accepted"] > 0
  assert (engine.stats["window_pages_released"] > 0) == (which == "alibi_model")
  assert engine.stats["decode_steps"] < sum(len(r.tokens) for r in requests)
  assert _all_pages_back(engine)


def test_speculative_engine_samples_only_what_the_target_allows(model):
  """top_k=2 sampling with proposals: every emitted token is one of the target's two most
  likely at its position (a proposal accepted outside the filter would break this), and a
  penalised request in the batch turns proposals off without breaking anything."""
  import jax.numpy as jnp
  from flax import nnx
  graphdef, weights = model
  engine = engine_lib.Engine(graphdef, weights, engine_lib.EngineConfig(
      max_slots=4, num_pages=64, page_size=8, prefill_chunk=16, speculative_k=3))
  prompts = _repetitive_prompts(10, seed=1)
  params = [sampling.SamplingParams(max_tokens=20, temperature=1.0, top_k=2, seed=i,
                                    repetition_penalty=1.3 if i == 9 else 1.0)
            for i in range(10)]
  requests = engine_lib.generate_all(engine, prompts, params)
  assert all(len(r.tokens) == 20 for r in requests)
  assert engine.stats["speculative_accepted"] > 0
  # The penalised request drafts nothing and draws exactly as plain decoding does.
  assert requests[9].tokens == _alone(model, prompts[9], params[9]).tokens
  net = nnx.merge(graphdef, weights)
  for r in requests[:9]:
    seq = r.prompt + r.tokens
    logits = np.asarray(net(jnp.asarray([seq]))[0])
    top2 = np.argsort(-logits, axis=-1)[:, :2]
    for i, t in enumerate(r.tokens):
      assert t in top2[len(r.prompt) - 1 + i], (r.id, i)
  assert _all_pages_back(engine)


@pytest.fixture(scope="module")
def draft_model():
  """A different, smaller model with the same vocabulary (its proposals are often wrong)."""
  return transformer.split(transformer.create(tiny_model(n_layers=1, init_std=0.4), 7))


@pytest.mark.parametrize("kind", ["self", "layer_skip"])
def test_model_draft_in_the_engine_greedy_equals_each_request_alone(model, kind):
  """The target as its own draft must see every greedy proposal accepted: that holds only if
  the draft's cache (filled by prefill, recomputed after preemption, rolled by lengths) holds
  what the target's does."""
  from jaxllm.inference import speculative
  graphdef, weights = model
  draft = (speculative.model_draft(graphdef, weights) if kind == "self"
           else speculative.layer_skip_draft(graphdef, weights, 1))
  # A small pool, so proposals sometimes find no page and preemption recomputes both caches.
  engine = engine_lib.Engine(graphdef, weights, engine_lib.EngineConfig(
      max_slots=4, num_pages=12, page_size=8, prefill_chunk=16, max_seq_len=64,
      speculative_k=3), draft=draft)
  params = [sampling.SamplingParams(max_tokens=int(m), stop_token_ids=(5,) if i % 3 else (),
                                    repetition_penalty=1.3 if i == 4 else 1.0)
            for i, m in enumerate(np.random.default_rng(3).integers(1, 30, 10))]
  requests = engine_lib.generate_all(engine, _repetitive_prompts(10, seed=4), params)
  _check_equal_alone(model, requests)
  assert engine.stats["preemptions"] > 0
  accepted = engine.stats["speculative_accepted"] / engine.stats["speculative_proposed"]
  assert accepted > (0.95 if kind == "self" else 0.05), accepted
  assert _all_pages_back(engine)


def test_model_draft_in_the_engine_samples_only_what_the_target_allows(model, draft_model):
  import jax.numpy as jnp
  from flax import nnx
  from jaxllm.inference import speculative
  graphdef, weights = model
  engine = engine_lib.Engine(graphdef, weights, engine_lib.EngineConfig(
      max_slots=4, num_pages=64, page_size=8, prefill_chunk=16, speculative_k=3),
      draft=speculative.model_draft(*draft_model))
  prompts = _repetitive_prompts(8, seed=6)
  params = [sampling.SamplingParams(max_tokens=16, temperature=1.0, top_k=2, seed=i)
            for i in range(8)]
  requests = engine_lib.generate_all(engine, prompts, params)
  assert engine.stats["speculative_accepted"] > 0
  net = nnx.merge(graphdef, weights)
  for r in requests:
    assert len(r.tokens) == 16
    logits = np.asarray(net(jnp.asarray([r.prompt + r.tokens]))[0])
    top2 = np.argsort(-logits, axis=-1)[:, :2]
    for i, t in enumerate(r.tokens):
      assert t in top2[len(r.prompt) - 1 + i], (r.id, i)


def test_engine_refuses_a_draft_it_cannot_use(model):
  from jaxllm.inference import speculative
  graphdef, weights = model
  other = transformer.split(transformer.create(tiny_model(n_layers=1, vocab_size=80), 1))
  cfg = engine_lib.EngineConfig(num_pages=64, page_size=8, speculative_k=2)
  with pytest.raises(ValueError, match="vocabulary"):
    engine_lib.Engine(graphdef, weights, cfg, draft=speculative.model_draft(*other))
  with pytest.raises(ValueError, match="speculative_k"):
    engine_lib.Engine(graphdef, weights, engine_lib.EngineConfig(num_pages=64, page_size=8),
                      draft=speculative.model_draft(*other))


def test_logit_bias_forces_and_bans_tokens_and_leaves_neighbours_alone(model):
  """+100 on a token makes every greedy draw that token; -100 on the free greedy choice gives
  the model's runner-up (the full forward's second-largest logit), while logprobs stay the
  model's own; a request without a bias in the same batch (a speculative engine: the biased
  rows draft nothing) decodes as alone."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  graphdef, params = model
  prompt = [5, 9, 2, 7]
  plain = sampling.SamplingParams(max_tokens=6)
  free = _alone(model, prompt, plain)
  logits = nnx.merge(graphdef, params)(jnp.asarray([prompt], jnp.int32))[0, -1]
  top2 = np.argsort(np.asarray(logits))[::-1][:2]
  assert free.tokens[0] == top2[0]
  engine = engine_lib.Engine(graphdef, params, engine_lib.EngineConfig(
      max_slots=4, num_pages=32, page_size=8, speculative_k=2))
  forced = engine.submit(prompt, sampling.SamplingParams(max_tokens=6, logit_bias={11: 100}))
  banned = engine.submit(prompt, sampling.SamplingParams(max_tokens=1,
                                                         logit_bias={int(top2[0]): -100.0}))
  neighbour = engine.submit(prompt, plain)
  engine.run_until_idle()
  assert forced.tokens == [11] * 6
  assert banned.tokens == [int(top2[1])]
  logp = np.asarray(jax.nn.log_softmax(logits))
  np.testing.assert_allclose(banned.logprobs[0], logp[top2[1]], atol=1e-5)
  assert neighbour.tokens == free.tokens
  with pytest.raises(ValueError, match="outside the vocabulary"):
    engine.submit(prompt, sampling.SamplingParams(logit_bias={10 ** 6: 1.0}))
  with pytest.raises(ValueError, match="outside the vocabulary"):
    engine.submit(prompt, sampling.SamplingParams(stop_token_ids=(10 ** 6,)))
  with pytest.raises(ValueError, match=r"\[-100, 100\]"):
    sampling.SamplingParams(logit_bias={3: 101})


def test_min_tokens_and_ignore_eos_hold_off_the_end(model):
  """With the free greedy first token as the end of sequence, a plain request ends at once; one
  with min_tokens=3 draws the runner-up there and is held off eos (and its stop token) for
  three tokens, as a +-inf bias on those tokens would; ignore_eos emits eos as a token and runs
  to max_tokens, exactly the free greedy tokens."""
  graphdef, params = model
  prompt = [5, 9, 2, 7]
  free = _alone(model, prompt, sampling.SamplingParams(max_tokens=6)).tokens
  eos, stop = free[0], 13
  engine = engine_lib.Engine(graphdef, params, engine_lib.EngineConfig(
      max_slots=4, num_pages=32, page_size=8), eos_id=eos)
  plain = engine.submit(prompt, sampling.SamplingParams(max_tokens=6))
  held = engine.submit(prompt, sampling.SamplingParams(max_tokens=6, min_tokens=3,
                                                       stop_token_ids=(stop,)))
  banned = engine.submit(prompt, sampling.SamplingParams(
      max_tokens=3, logit_bias={eos: -100, stop: -100}))
  ignoring = engine.submit(prompt, sampling.SamplingParams(max_tokens=6, ignore_eos=True))
  engine.run_until_idle()
  assert (plain.tokens, plain.finish_reason) == ([], "stop")
  assert held.tokens[:3] == banned.tokens and len(banned.tokens) == 3
  assert eos not in held.tokens[:3] and stop not in held.tokens[:3]
  assert ignoring.tokens == free and ignoring.finish_reason == "length"
  with pytest.raises(ValueError, match="min_tokens"):
    sampling.SamplingParams(max_tokens=2, min_tokens=3)
