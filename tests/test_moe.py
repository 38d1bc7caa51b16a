"""The MoE layer against a per-token loop reference (float32), and its routing statistics.

The reference picks each token's experts by sorting its scores in numpy (ties: lower expert
first), then sums the chosen experts' SwiGLU outputs token by token; capacity mode walks the
slots in GShard's priority order (all first choices, then second choices, in token order) and
drops those beyond each expert's capacity. Gradients of the reference come from jax.grad
through that loop, with the selections fixed.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.model import moe
from jaxllm.model import transformer
from tests.helpers import tiny_model

N, D, F, E, K = 24, 16, 8, 4, 2


def _weights(seed=0, e=E):
  rng = np.random.default_rng(seed)
  w = lambda *s: jnp.asarray(rng.normal(0, 0.3, s), jnp.float32)
  return dict(x=w(N, D), router=w(D, e), gate=w(e, D, F), up=w(e, D, F), down=w(e, F, D))


def _choices(logits, k, router="softmax", bias=None):
  """Per token: the k chosen experts (numpy sort, ties to the lower index)."""
  logits = np.asarray(logits, np.float64)
  scores = (np.exp(logits - logits.max(-1, keepdims=True)) if router == "softmax"
            else 1 / (1 + np.exp(-logits)))
  if router == "softmax":
    scores = scores / scores.sum(-1, keepdims=True)
  select = scores + (0 if bias is None else np.asarray(bias))
  return [sorted(range(logits.shape[1]), key=lambda e: (-select[n, e], e))[:k]
          for n in range(logits.shape[0])]


def _reference(p, chosen, *, router="softmax", norm=False, capacity=None, xp=np):
  """Per-token loop: sum over the (kept) chosen experts of weight * SwiGLU_e(x); `xp` numpy
  (float64) or jax.numpy (for gradients)."""
  if xp is np:
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
  logits = p["x"] @ p["router"]
  if router == "softmax":
    scores = xp.exp(logits - logits.max(-1, keepdims=True))
    scores = scores / scores.sum(-1, keepdims=True)
  else:
    scores = 1 / (1 + xp.exp(-logits))
  silu = lambda a: a / (1 + xp.exp(-a))
  kept = [[True] * len(c) for c in chosen]
  if capacity is not None:
    used = [0] * p["gate"].shape[0]
    for j in range(len(chosen[0])):
      for n, c in enumerate(chosen):
        kept[n][j] = used[c[j]] < capacity
        used[c[j]] += 1
  rows = []
  for n, c in enumerate(chosen):
    w = xp.stack([scores[n, e] for e in c])
    if norm:
      w = w / xp.sum(w)
    out = 0.0
    for j, e in enumerate(c):
      if kept[n][j]:
        h = silu(p["x"][n] @ p["gate"][e]) * (p["x"][n] @ p["up"][e])
        out = out + w[j] * (h @ p["down"][e])
    rows.append(out + xp.zeros((p["x"].shape[1],)))
  return xp.stack(rows)


def _ours(p, *, router="softmax", norm=False, factor=0.0, impl="xla"):
  r = moe.route(p["x"] @ p["router"], K, router=router, norm_topk_prob=norm)
  ex = moe.Experts(p["gate"], p["up"], p["down"])
  if factor:
    slots, dropped = moe.with_capacity(p["x"], r.ids, ex, factor=factor, n_experts=E)
  else:
    slots, dropped = moe.dropless(p["x"], r.ids, ex, impl=impl), 0.0
  return jnp.einsum("nkd,nk->nd", slots, r.weights), dropped


@pytest.mark.parametrize("router,norm,impl", [("softmax", False, "xla"), ("softmax", True, "tiled"),
                                              ("sigmoid", True, "xla")])
def test_dropless_equals_per_token_loop(router, norm, impl):
  p = _weights()
  chosen = _choices(p["x"] @ p["router"], K, router)
  got, _ = jax.jit(lambda p: _ours(p, router=router, norm=norm, impl=impl))(p)
  want = _reference(p, chosen, router=router, norm=norm)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_capacity_mode_drops_like_gshard_and_equals_the_loop():
  p = _weights(1)
  chosen = _choices(p["x"] @ p["router"], K)
  factor = 0.5  # C = ceil(0.5 * 24 * 2 / 4) = 6 slots per expert: most experts overflow
  C = moe.capacity(N, K, E, factor)
  got, dropped = _ours(p, factor=factor)
  want = _reference(p, chosen, capacity=C)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  loads = np.bincount(np.asarray(chosen).ravel(), minlength=E)
  assert float(dropped) == np.maximum(loads - C, 0).sum() > 0


def test_dropless_equals_capacity_mode_with_room_for_every_slot():
  p = _weights(2)
  dropless, _ = _ours(p)
  capacity, dropped = _ours(p, factor=float(E))  # C = N k: every slot fits
  assert float(dropped) == 0
  chex.assert_trees_all_close(dropless, capacity, atol=1e-6)


@pytest.mark.parametrize("factor,impl", [(0.0, "xla"), (0.0, "tiled"), (0.5, None)])
def test_gradients_equal_the_loop_reference(factor, impl):
  p = _weights(3)
  chosen = _choices(p["x"] @ p["router"], K)
  C = moe.capacity(N, K, E, factor) if factor else None
  probe = jnp.asarray(np.random.default_rng(4).normal(size=(N, D)), jnp.float32)
  ours = jax.grad(lambda p: jnp.sum(_ours(p, factor=factor, impl=impl)[0] * probe))(p)
  want = jax.jit(jax.grad(lambda p: jnp.sum(_reference(p, chosen, capacity=C, xp=jnp) * probe)))(p)
  for name in p:
    chex.assert_trees_all_close(ours[name], want[name], atol=1e-5, rtol=1e-4)


class RouteVariants(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_ties_choose_the_lower_expert_first(self):
    route = self.variant(lambda logits: moe.route(logits, 2))
    tied = jnp.zeros((3, 5), jnp.float32)
    np.testing.assert_array_equal(route(tied).ids, [[0, 1]] * 3)
    partly = jnp.asarray([[0.0, 2.0, 2.0, 2.0, 0.0]])
    np.testing.assert_array_equal(route(partly).ids, [[1, 2]])

  @chex.variants(with_jit=True, without_jit=True)
  def test_bias_steers_selection_but_not_weights(self):
    logits = jnp.asarray([[2.0, 1.0, 0.0]])
    bias = jnp.asarray([0.0, 0.0, 1.0])
    r = self.variant(lambda l, b: moe.route(l, 1, bias=b))(logits, bias)
    assert int(r.ids[0, 0]) == 2
    np.testing.assert_allclose(r.weights[0, 0], jax.nn.softmax(logits[0])[2], rtol=1e-6)


def test_gathered_decode_path_equals_grouped_dispatch():
  p = _weights(5)
  r = moe.route(p["x"] @ p["router"], K)
  ex = moe.Experts(p["gate"], p["up"], p["down"])
  chex.assert_trees_all_close(moe.gathered(p["x"], r.ids, ex), moe.dropless(p["x"], r.ids, ex),
                              atol=1e-5)


def test_balancing_loss_is_one_when_balanced_and_e_when_collapsed():
  # 8 tokens, 4 experts, k=1: uniform probabilities and an even split give exactly 1.
  uniform = moe.Routing(jnp.arange(8, dtype=jnp.int32)[:, None] % 4, jnp.ones((8, 1)),
                        jnp.full((8, 4), 0.25), jnp.zeros((8,)))
  stats = jax.tree.map(lambda a: a[None], moe.routing_stats(uniform, 4))
  aux, z = moe.losses(stats, 1)
  assert float(aux) == pytest.approx(1.0) and float(z) == 0.0
  collapsed = moe.Routing(jnp.zeros((8, 1), jnp.int32), jnp.ones((8, 1)),
                          jnp.asarray([[1.0, 0, 0, 0]] * 8), jnp.full((8,), 2.0))
  stats = jax.tree.map(lambda a: a[None], moe.routing_stats(collapsed, 4))
  aux, z = moe.losses(stats, 1)
  assert float(aux) == pytest.approx(4.0) and float(z) == pytest.approx(4.0)
  summary = moe.load_summary(stats)
  assert float(summary["max_load"][0]) == 4.0 and float(summary["entropy"][0]) == 0.0


def test_router_bias_moves_toward_balance():
  bias = moe.update_router_bias(jnp.zeros((1, 4)), jnp.asarray([[10.0, 2.0, 2.0, 2.0]]), 0.1)
  np.testing.assert_allclose(bias, [[-0.1, 0.1, 0.1, 0.1]])


def _moe_model(**overrides):
  values = dict(n_experts=E, experts_per_token=K, moe_d_ff=F, n_layers=3, moe_every=2,
                n_shared_experts=1, shared_expert_gate=True, dtype="float32")
  values.update(overrides)
  return transformer.create(tiny_model(**values), seed=0)


def test_moe_block_equals_the_loop_with_shared_experts():
  model = _moe_model()
  block = jax.tree.map(lambda a: a[0], model.moe_blocks.moe)
  x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 12, 32)), jnp.float32)
  got, stats = block(x)
  p = {"x": x.reshape(24, 32), "router": block.router[...], "gate": block.gate[...],
       "up": block.up[...], "down": block.down[...]}
  routed = _reference(p, _choices(p["x"] @ p["router"], K))
  x64 = np.asarray(p["x"], np.float64)
  sh = jax.tree.map(lambda a: np.asarray(a, np.float64), (block.shared.gate[...],
                                                          block.shared.up[...],
                                                          block.shared.down[...],
                                                          block.shared_gate[...]))
  g = x64 @ sh[0]
  shared = 1 / (1 + np.exp(-(x64 @ sh[3]))) * ((g / (1 + np.exp(-g)) * (x64 @ sh[1])) @ sh[2])
  np.testing.assert_allclose(got.reshape(24, 32), routed + shared, atol=1e-5)
  assert float(stats["tokens"]) == 24 and float(jnp.sum(stats["load"])) == 24 * K


def test_layer_layout_places_moe_layers_like_hugging_face():
  # Qwen2-MoE's rule with decoder_sparse_step=m: layer i is sparse iff (i + 1) % m == 0.
  for n_layers, m, first in [(6, 2, 0), (5, 2, 0), (7, 3, 0), (6, 1, 2), (4, 1, 0)]:
    cfg = tiny_model(n_layers=n_layers, n_experts=4, moe_every=m, first_dense_layers=first)
    layout = transformer.layer_layout(cfg)
    want = [i for i in range(n_layers) if i >= first and (i - first + 1) % m == 0]
    assert list(layout.moe_depths()) == want
    assert sorted(list(layout.dense_depths()) + want) == list(range(n_layers))


def test_moe_model_cached_decode_equals_full_forward():
  """Prefill + decode through both cache layouts (the inference dispatch: gathered experts for
  a decode step, grouped for a prefill chunk) give the full forward's logits."""
  from flax import nnx
  from jaxllm.inference import generate
  model = _moe_model(first_dense_layers=1, n_layers=4)
  graphdef, params = transformer.split(model)
  tokens = jnp.asarray(np.random.default_rng(7).integers(0, 64, (2, 10)), jnp.int32)
  full = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, tokens)
  extend = jax.jit(lambda p, t, c: nnx.merge(graphdef, p).extend(t, c))
  for kind in generate.CACHE_KINDS:
    cache = generate.new_cache(model.cfg, kind, [16, 16], max_len=16)
    logits, cache = extend(params, tokens[:, :7], cache)
    steps = [logits]
    for t in range(7, 10):
      logits, cache = extend(params, tokens[:, t:t + 1], cache)
      steps.append(logits)
    chex.assert_trees_all_close(jnp.concatenate(steps, axis=1), full, atol=2e-5)


def test_moe_generation_speculative_and_engine_equal_plain_greedy_decoding():
  """An MoE model (dense first layer, shared expert) decodes through every inference path:
  speculative decoding with n-gram and layer-skip drafts and the continuous-batching engine
  give plain greedy decoding's tokens."""
  from jaxllm.inference import engine as engine_lib
  from jaxllm.inference import generate as gen
  from jaxllm.inference import sampling, speculative
  graphdef, params = transformer.split(_moe_model(first_dense_layers=1, n_layers=4,
                                                  init_std=0.4))
  rng = np.random.default_rng(8)
  prompts = [rng.integers(0, 64, n).tolist() for n in (5, 17, 9)]
  sp = [sampling.SamplingParams(max_tokens=12)] * len(prompts)
  plain = [r.tokens for r in gen.generate_requests(graphdef, params, prompts, sp)]
  for draft in (speculative.ngram_draft(2), speculative.layer_skip_draft(graphdef, params, 2)):
    results, _ = speculative.speculative_generate(graphdef, params, prompts, sp, draft, k=3)
    assert [r.tokens for r in results] == plain, draft.kind
  engine = engine_lib.Engine(graphdef, params, engine_lib.EngineConfig(
      max_slots=2, num_pages=32, page_size=8, prefill_chunk=8))
  requests = [engine.submit(p, s) for p, s in zip(prompts, sp)]
  while not engine.idle:
    engine.step()
  assert [r.tokens for r in requests] == plain


# ------------------------------------------------------------------------------ quantization


def _calibration_setup():
  from jaxllm.quant import params as qparams
  model = _moe_model(first_dense_layers=1, n_layers=4, moe_every=1, vocab_size=64, moe_d_ff=16)
  graphdef, params = transformer.split(model)
  rows = np.asarray(jax.random.randint(jax.random.PRNGKey(2), (8, 16), 0, 64))
  return graphdef, params, rows, qparams


def _dequantized(params):
  from jaxllm.quant import tensor as qtensor
  return jax.tree.map(lambda x: x.dequantize() if qtensor.is_qtensor(x) else x, params,
                      is_leaf=qtensor.is_qtensor)


def test_int4_experts_compute_with_their_dequantized_weights_in_every_path():
  """RTN int4 covers every expert; the forward (grouped dispatch) and cached decode (gathered
  experts, read quantized) both equal the model holding the dequantized weights."""
  from flax import nnx
  from jaxllm.inference import generate
  graphdef, params, rows, qparams = _calibration_setup()
  qp, spec = qparams.quantize_params(params, qparams.QuantSpec(bits=4, group_size=16))
  assert {"moe_blocks/moe/gate", "moe_blocks/moe/up", "moe_blocks/moe/down",
          "moe_blocks/moe/shared/down", "blocks/mlp/down"} <= set(spec.quantized)
  assert qp["moe_blocks"]["moe"]["gate"].values.shape[:2] == (3, E)  # [Lm, E, ...] packed
  ids = jnp.asarray(rows[:2, :9])
  forward = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))
  want = forward(_dequantized(qp), ids)
  chex.assert_trees_all_close(forward(qp, ids), want, atol=1e-5)
  extend = jax.jit(lambda p, t, c: nnx.merge(graphdef, p).extend(t, c))
  cache = generate.new_cache(nnx.merge(graphdef, qp).cfg, "contiguous", [16, 16], max_len=16)
  logits, cache = extend(qp, ids[:, :8], cache)
  step, _ = extend(qp, ids[:, 8:], cache)  # 2 tokens x k=2 <= 4 experts: the gathered path
  chex.assert_trees_all_close(step, want[:, 8:], atol=1e-5)


def test_gptq_calibrates_each_expert_on_the_tokens_routed_to_it():
  from jaxllm.quant import calibrate, gptq, methods
  graphdef, params, rows, qparams = _calibration_setup()
  bgd = calibrate.block_graphdef(graphdef, params, "moe_blocks")
  lp = calibrate.layer_params(params["moe_blocks"], 0)
  x = calibrate.embed(graphdef, params, rows)
  _, inputs = calibrate.run_block(bgd, lp, x)
  hessians = methods._hessians("moe/gate", [inputs], E)
  mlp_in, ids = np.asarray(inputs.gate_up), np.asarray(inputs.expert_ids)
  for e in range(E):
    routed = mlp_in[(ids == e).any(axis=1)]
    np.testing.assert_allclose(hessians[e], gptq.hessian(routed) if len(routed) else np.eye(32),
                               rtol=1e-6, atol=1e-9)
  down = methods._hessians("moe/down", [inputs], E)
  slots = np.asarray(inputs.down)
  np.testing.assert_allclose(down[1], gptq.hessian(slots[ids == 1]), rtol=1e-6, atol=1e-9)
  qp, spec = methods.quantize_model(graphdef, params, qparams.QuantSpec(bits=4, group_size=16,
                                                                        method="gptq"), rows,
                                    chunk_rows=4, progress=False)
  assert "moe_blocks/moe/down" in spec.quantized and "blocks/mlp/up" in spec.quantized
  assert qp["moe_blocks"]["moe"]["down"].values.shape[:2] == (3, E)


def test_awq_scaling_keeps_the_float_moe_model():
  """AWQ folds its scales into the norm (router, shared gate and every expert absorb them) and
  into each expert's up columns: in float the model computes the same function."""
  from flax import nnx
  from jaxllm.quant import methods
  graphdef, params, rows, qparams = _calibration_setup()
  spec = qparams.QuantSpec(bits=4, group_size=16, method="awq")
  scaled, ratios = methods._awq_scale(graphdef, params, spec, rows, chunk_rows=4,
                                      progress=False)
  assert ratios["moe_blocks/moe/down"].shape[:2] == (3, E)
  assert not np.allclose(scaled["moe_blocks"]["moe"]["router"],
                         params["moe_blocks"]["moe"]["router"])
  forward = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))
  ids = jnp.asarray(rows[:2])
  chex.assert_trees_all_close(forward(scaled, ids), forward(params, ids), atol=2e-5)
  qp, spec = methods.quantize_model(graphdef, params, spec, rows, chunk_rows=4, progress=False)
  assert "moe_blocks/moe/up" in spec.quantized
