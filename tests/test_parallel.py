"""Sharded training equals single-device training, and shards hold what the plan says.

8 simulated CPU devices (conftest). Each mesh runs 3 float32 train steps from the same init on the
same batches; loss and updated params must match the 1-device run (relative <= 1e-5).
"""

import chex
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxllm import config as config_lib
from jaxllm.parallel import mesh as mesh_lib
from jaxllm.parallel import rules
from jaxllm.train import loop, step as step_lib
from tests.helpers import tiny_experiment

# Every sharded dim divides by 8: heads, kv heads, mlp, vocab (tensor) and embed (fsdp).
MODEL = dict(vocab_size=384, d_model=64, n_layers=4, n_heads=8, n_kv_heads=8, head_dim=8,
             d_ff=128, dtype="float32")
MESHES = {
    "dp8": dict(data=8),
    "fsdp8": dict(data=1, fsdp=8),
    "tp2": dict(data=1, tensor=2),
    "tp4": dict(data=1, tensor=4),
    "tp8": dict(data=1, tensor=8),
    "dp2_fsdp2_tp2": dict(data=2, fsdp=2, tensor=2),
    "pp2": dict(data=1, stage=2),
    "pp4": dict(data=1, stage=4),
    "fsdp2_tp2_pp2": dict(data=1, fsdp=2, tensor=2, stage=2),
    # Sequence parallelism: the residual stream split over the sequence inside each TP group.
    "tp2_sp": dict(data=1, tensor=2, sequence_parallel=True),
    "dp2_fsdp2_tp2_sp": dict(data=2, fsdp=2, tensor=2, sequence_parallel=True),
    "fsdp2_tp2_pp2_sp": dict(data=1, fsdp=2, tensor=2, stage=2, sequence_parallel=True),
    # Context parallelism: every row's sequence split over `context`, K/V gathered.
    "cp2": dict(data=1, context=2),
    "cp4": dict(data=1, context=4),
    "dp2_cp2_tp2": dict(data=2, context=2, tensor=2),
    "fsdp2_cp4": dict(data=1, fsdp=2, context=4),
    "cp2_tp2_pp2_sp": dict(data=1, context=2, tensor=2, stage=2, sequence_parallel=True),
}


def _config(mesh, chunks=1, **train):
  return tiny_experiment(model=MODEL, train={**dict(batch_size=8, seq_len=32, microbatches=4,
                                                    pipeline_chunks=chunks), **train},
                         mesh={"data": 1, "fsdp": 1, "tensor": 1, **mesh})


def _batches(cfg, n=3):
  rng = np.random.default_rng(0)
  B, T, V = cfg.train.batch_size, cfg.train.seq_len, cfg.model.vocab_size
  out = []
  for _ in range(n):
    tokens = rng.integers(0, V, size=(B, T + 1)).astype(np.int32)
    seg = np.ones((B, T), np.int32)
    seg[:, T // 2:] = 2  # two packed documents per row
    pos = np.concatenate([np.arange(T // 2), np.arange(T - T // 2)]).astype(np.int32)
    out.append({"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                "weights": np.ones((B, T), np.float32), "segment_ids": seg,
                "positions": np.broadcast_to(pos, (B, T)).copy()})
  return out


def _train(cfg, devices, init=None):
  """(state after 3 steps, their losses). The state starts as `loop.initial_state` creates it
  on the mesh, or from `init` (a host copy of a one-device initial state) put in the mesh's
  shardings: `test_initial_state_on_a_mesh_equals_one_device` shows the two are equal, and
  putting skips one init compile per mesh."""
  mesh = mesh_lib.make_mesh(cfg.mesh, devices)
  graphdef, _, shardings, optimizer = loop.state_shardings(cfg, mesh)
  state = (loop.initial_state(cfg, optimizer, shardings) if init is None
           else jax.device_put(init, shardings))
  batch_sh = rules.batch_sharding(mesh)
  step_fn = step_lib.make_train_step(graphdef, optimizer, cfg.train,
                                    grad_shardings=loop.gradient_shardings(cfg, shardings, mesh))
  step = mesh_lib.under_mesh(jax.jit(step_fn, in_shardings=(shardings, batch_sh),
                                     out_shardings=(shardings, None)), mesh)
  losses = []
  for batch in _batches(cfg):
    state, metrics = step(state, {k: jax.device_put(v, batch_sh) for k, v in batch.items()})
    losses.append(float(metrics["loss"]))
  return state, losses


def _assert_trains_alike(state, losses, want_state, want_losses):
  """Losses and every parameter (relative norm of the difference) within 1e-5 of the
  reference run."""
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
  want = dict(jax.tree_util.tree_leaves_with_path(jax.device_get(want_state["params"])))
  for path, got in jax.tree_util.tree_leaves_with_path(jax.device_get(state["params"])):
    rel = np.linalg.norm(got - want[path]) / np.linalg.norm(want[path])
    assert rel <= 1e-5, (jax.tree_util.keystr(path), rel)


def _initial_state(cfg, devices):
  mesh = mesh_lib.make_mesh(cfg.mesh, devices)
  _, _, shardings, optimizer = loop.state_shardings(cfg, mesh)
  return loop.initial_state(cfg, optimizer, shardings)


@pytest.fixture(scope="module")
def single_device_init():
  """The one-device initial state, on the host."""
  return jax.device_get(_initial_state(_config({"data": 1}), jax.devices()[:1]))


@pytest.fixture(scope="module")
def single_device(single_device_init):
  return _train(_config({"data": 1}), jax.devices()[:1], init=single_device_init)


@pytest.mark.parametrize("mesh,chunks", [
    (dict(data=1, fsdp=8), 1), (dict(data=1, tensor=8), 1), (dict(data=1, stage=4), 1),
    (dict(data=1, fsdp=2, tensor=2, stage=2), 2),
    (dict(data=2, fsdp=2, tensor=2, zero_stage=2), 1)],
    ids=["fsdp8", "tp8", "pp4", "fsdp2_tp2_pp2_circular", "dp2_fsdp2_tp2_zero2"])
def test_initial_state_on_a_mesh_equals_one_device(mesh, chunks, single_device_init):
  """`loop.initial_state` creates each shard where it lives, and the values are those of one
  device, bit for bit (params, Adam moments, ZeRO's moment shards, the step counters)."""
  n = int(np.prod([v for k, v in mesh.items() if k != "zero_stage"]))
  state = jax.device_get(_initial_state(_config(mesh, chunks=chunks), jax.devices()[:n]))
  chex.assert_trees_all_equal(state, single_device_init)


CIRCULAR = {"pp2_circular": dict(data=1, stage=2),
            "fsdp2_tp2_pp2_circular": dict(data=1, fsdp=2, tensor=2, stage=2)}


# Ring attention for context parallelism (the sequence reordered for load balance).
RING = {"cp2_ring": dict(data=1, context=2), "cp4_ring": dict(data=1, context=4),
        "dp2_cp2_tp2_ring": dict(data=2, context=2, tensor=2),
        "fsdp2_cp2_pp2_ring": dict(data=1, fsdp=2, context=2, stage=2)}


# ZeRO-1/2 over the data axis, alone and beside FSDP, tensor and pipeline parallelism (the
# dp4 case accumulates 2 microbatches of gradients in their ZeRO-2 shards).
ZERO = {"dp8_zero1": dict(data=8, zero_stage=1), "dp8_zero2": dict(data=8, zero_stage=2),
        "dp4_zero2_accum2": dict(data=4, zero_stage=2),
        "dp2_fsdp2_tp2_zero1": dict(data=2, fsdp=2, tensor=2, zero_stage=1),
        "dp2_fsdp2_tp2_zero2": dict(data=2, fsdp=2, tensor=2, zero_stage=2),
        "dp2_tp2_pp2_zero2": dict(data=2, tensor=2, stage=2, zero_stage=2)}


# The 1F1B schedule (loss and backward inside the pipeline), alone and with FSDP, TP, sequence
# parallelism and ZeRO.
ONE_F_ONE_B = {"pp2_1f1b": dict(data=1, stage=2), "pp4_1f1b": dict(data=1, stage=4),
               "fsdp2_tp2_pp2_1f1b": dict(data=1, fsdp=2, tensor=2, stage=2),
               "dp2_tp2_pp2_sp_zero2_1f1b": dict(data=2, tensor=2, stage=2,
                                                 sequence_parallel=True, zero_stage=2)}


@pytest.mark.parametrize("name", list(MESHES) + list(CIRCULAR) + list(RING) + list(ZERO)
                         + list(ONE_F_ONE_B))
def test_sharded_training_equals_single_device(name, single_device, single_device_init):
  mesh = {**MESHES, **CIRCULAR, **RING, **ZERO, **ONE_F_ONE_B}[name]
  n = int(np.prod([v for k, v in mesh.items() if k != "zero_stage"]))
  # Circular: 4 layers in 2 stages x 2 chunks, 4 microbatches going around the ring twice.
  train = dict(context_parallel="ring") if name in RING else {}
  if name in ONE_F_ONE_B:
    train["pipeline_schedule"] = "1f1b"
  if name.endswith("accum2"):
    train["grad_accum"] = 2
  state, losses = _train(_config(mesh, chunks=2 if name in CIRCULAR else 1, **train),
                         jax.devices()[:n], init=single_device_init)
  _assert_trains_alike(state, losses, *single_device)


def test_ring_flash_training_equals_single_device():
  """Ring attention through the flash kernel (interpreted here; head_dim 64, the kernel's
  smallest), composed with data and tensor parallelism, trains as one device does."""
  model = dict(MODEL, n_heads=2, n_kv_heads=2, head_dim=64)

  def config(mesh, impl, **train):
    return tiny_experiment(model=dict(model, attention_impl=impl),
                           train=dict(batch_size=4, seq_len=32, microbatches=2, **train),
                           mesh={"data": 1, "fsdp": 1, "tensor": 1, **mesh})

  want_state, want_losses = _train(config({}, "xla"), jax.devices()[:1])
  state, losses = _train(config(dict(data=2, context=2, tensor=2), "pallas",
                                context_parallel="ring"), jax.devices())
  _assert_trains_alike(state, losses, want_state, want_losses)


FAMILY_VARIANTS = {
    # OLMo 2's post-norm and q/k norms over all heads (a reduction across tensor-split heads),
    # with Qwen2's q/k/v biases.
    "post_norm": dict(norm_placement="post", qk_norm=True, qk_norm_over_heads=True,
                      qkv_bias=True),
    # Gemma 2/3: sandwich norms of (1 + w), GeGLU, scaled embeddings, soft caps, a softmax scale
    # of 1/sqrt(12), and local layers (window 8, their own RoPE base) with every 2nd global:
    # each layer's kind follows its depth, which travels with its params through the pipeline.
    "gemma": dict(norm_placement="sandwich", norm_offset=1.0, embed_scale=True,
                  mlp_activation="gelu_tanh", qk_norm=True, query_pre_attn_scalar=12,
                  global_every=2, sliding_window=8, rope_local_theta=1000.0,
                  attn_logit_soft_cap=5.0, final_logit_soft_cap=10.0),
}


def _family_config(variant, mesh, **train):
  return tiny_experiment(model=dict(MODEL, **FAMILY_VARIANTS[variant]),
                         train=dict(batch_size=8, seq_len=32, microbatches=4, **train),
                         mesh={"data": 1, "fsdp": 1, "tensor": 1, **mesh})


@pytest.fixture(scope="module")
def family_single_device():
  """Each variant's one-device run, computed once for the three meshes that check it."""
  runs = {}

  def run(variant):
    if variant not in runs:
      runs[variant] = _train(_family_config(variant, {}), jax.devices()[:1])
    return runs[variant]
  return run


@pytest.mark.parametrize("variant", sorted(FAMILY_VARIANTS))
@pytest.mark.parametrize("mesh", [dict(data=2, fsdp=2, tensor=2, sequence_parallel=True),
                                  dict(data=1, fsdp=2, tensor=2, stage=2),
                                  dict(data=2, context=4)], ids=["dp_fsdp_tp_sp", "fsdp_tp_pp",
                                                                 "dp_cp4_ring"])
def test_family_variants_train_under_a_mesh_like_one_device(variant, mesh, family_single_device):
  """The families' block variants shard like the rest (ring attention included)."""
  ring = dict(context_parallel="ring") if "context" in mesh else {}
  state, losses = _train(_family_config(variant, mesh, **ring), jax.devices())
  _assert_trains_alike(state, losses, *family_single_device(variant))


def _device0_fraction(tree):
  """Bytes of `tree` held by device 0, as a fraction of the whole (unsharded) tree."""
  device0 = jax.devices()[0]
  held = total = 0
  for x in jax.tree.leaves(tree):
    total += x.nbytes
    held += sum(s.data.nbytes for s in x.addressable_shards if s.device == device0)
  return held / total


def test_fsdp8_holds_an_eighth_of_params_and_optimizer_state():
  cfg = _config(MESHES["fsdp8"])
  mesh = mesh_lib.make_mesh(cfg.mesh)
  _, _, shardings, optimizer = loop.state_shardings(cfg, mesh)
  state = loop.initial_state(cfg, optimizer, shardings)
  assert abs(_device0_fraction(state["params"]) - 1 / 8) <= 0.02 / 8
  assert abs(_device0_fraction(state["opt_state"]) - 1 / 8) <= 0.02 / 8


@pytest.mark.parametrize("mesh", [dict(data=8, zero_stage=1),
                                  dict(data=2, fsdp=2, tensor=2, zero_stage=2)],
                         ids=["dp8_zero1", "dp2_fsdp2_tp2_zero2"])
def test_zero_holds_an_nth_of_the_optimizer_moments_to_the_byte(mesh):
  """Each device holds 1/data of the Adam moments it holds without ZeRO (on top of the split
  fsdp and tensor give them); only the step counters stay whole. Stage 2 pins the gradients
  to the same shards."""
  def held_moments(cfg):
    device_mesh = mesh_lib.make_mesh(cfg.mesh)
    _, _, shardings, optimizer = loop.state_shardings(cfg, device_mesh)
    state = loop.initial_state(cfg, optimizer, shardings)
    moments = [x for x in jax.tree.leaves(state["opt_state"]) if x.ndim]
    counters = [x for x in jax.tree.leaves(state["opt_state"]) if not x.ndim]
    assert counters and all(x.sharding.is_fully_replicated for x in counters)
    held = {d: sum(s.data.nbytes for x in moments for s in x.addressable_shards
                   if s.device == d) for d in jax.devices()}
    return held, state, shardings, device_mesh

  cfg = _config(mesh)
  without, _, _, _ = held_moments(_config({**mesh, "zero_stage": 0}))
  held, state, shardings, device_mesh = held_moments(cfg)
  for device in jax.devices():
    assert held[device] * cfg.mesh.data == without[device], (device, held, without)
  grads = loop.gradient_shardings(cfg, shardings, device_mesh)
  if cfg.mesh.zero_stage == 2:
    mu = state["opt_state"][-1][0].mu  # clip_by_global_norm, then adamw's ScaleByAdamState
    assert ([s.spec for s in jax.tree.leaves(grads)]
            == [x.sharding.spec for x in jax.tree.leaves(mu)])
  else:
    assert grads is None


def test_tensor_parallel_splits_megatron_style():
  cfg = _config(MESHES["tp4"])
  mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[:4])
  _, _, shardings, optimizer = loop.state_shardings(cfg, mesh)
  specs = jax.tree.map(lambda s: s.spec, shardings["params"])
  blocks = specs["blocks"]
  # Column-parallel in (QKV, gate/up: heads / mlp split), row-parallel out (o, down).
  assert blocks["attn"]["q"] == P(None, None, "tensor", None)
  assert blocks["attn"]["k"] == blocks["attn"]["v"] == P(None, None, "tensor", None)
  assert blocks["attn"]["o"] == P(None, "tensor", None, None)
  assert blocks["mlp"]["gate"] == blocks["mlp"]["up"] == P(None, None, "tensor")
  assert blocks["mlp"]["down"] == P(None, "tensor", None)
  assert specs["embed"] == P("tensor", None)  # vocab-parallel embedding / tied head
  assert blocks["attn_norm"]["scale"] == P(None, None)  # norms replicated
  state = loop.initial_state(cfg, optimizer, shardings)
  q = state["params"]["blocks"]["attn"]["q"]
  assert {s.data.shape for s in q.addressable_shards} == {(4, 64, 2, 8)}  # [L, D, H/4, Dh]


def test_sequence_parallel_splits_the_residual_stream_over_the_sequence():
  """Under mesh.sequence_parallel the blocks' outputs are laid out [batch, seq / tensor, D]: the
  compiled step gathers the sequence back into the tensor-parallel matmuls (all-gathers plain
  tensor parallelism has none of)."""
  from jaxllm.bench import context
  from jaxllm.planner import aot

  def all_gathers(sequence_parallel):
    cfg = _config(dict(MESHES["tp2"], sequence_parallel=sequence_parallel))
    compiled, _ = aot.compiled_train_step(cfg, jax.devices()[:2])
    return context.collective_counts(compiled.as_text())["all-gather"]

  assert all_gathers(False) == 0 and all_gathers(True) > 0
  with pytest.raises(config_lib.ConfigError, match="mesh.sequence_parallel splits"):
    config_lib.validate_for_devices(_config(dict(data=8, sequence_parallel=True)), 8)


def test_context_parallel_bench_measures_less_memory_per_device():
  """`jaxllm.bench context`: with each row's 256 tokens over 2 devices, both strategies' compiled
  steps need fewer temporary bytes per device than one device alone, through the collectives
  they are built on (all-gathered K/V; K/V blocks passed by collective-permute)."""
  from jaxllm.bench import context
  result = context.run(_config({}), seq_lens=(256,), contexts=(1, 2))
  one, gather, ring = result["rows"]
  assert [(r["context"], r["strategy"], r["devices"]) for r in result["rows"]] == [
      (1, "-", 1), (2, "all_gather", 2), (2, "ring", 2)]
  assert one["collectives"] == dict.fromkeys(context.COLLECTIVES, 0)
  assert gather["collectives"]["all-gather"] > 0
  assert gather["collectives"]["collective-permute"] == 0
  assert ring["collectives"]["collective-permute"] > 0
  for row in (gather, ring):
    assert row["temp_bytes"] < 0.9 * one["temp_bytes"]
    assert row["temp_vs_context1"] == row["temp_bytes"] / one["temp_bytes"]
    assert row["plan_activation_bytes"] < one["plan_activation_bytes"]
  assert "| 256 | 2 | ring |" in context.table(result)


def test_ring_order_gives_every_device_the_same_causal_work():
  from jaxllm.ops import ring_attention
  T, C = 64, 4
  order = ring_attention.load_balance_order(T, C)
  assert sorted(order) == list(range(T))
  # Device i holds chunks i and 2C - 1 - i; unmasked (query, key) pairs per device are equal.
  work = [sum(q + 1 for q in order[i * T // C:(i + 1) * T // C]) for i in range(C)]
  assert len(set(work)) == 1, work
  with pytest.raises(ValueError, match="multiple of 2 x context"):
    ring_attention.load_balance_order(36, 4)
  with pytest.raises(config_lib.ConfigError, match="train.context_parallel=ring splits"):
    _config(dict(data=1, context=4), seq_len=36, context_parallel="ring")


def test_pipeline_stages_exchange_activations_by_ppermute():
  """stage > 1 really runs the shard_map pipeline (not a scan that XLA shards by layer)."""
  def lowered(mesh_axes):
    cfg = _config(mesh_axes)
    mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[:4])
    graphdef, abstract_state, shardings, optimizer = loop.state_shardings(cfg, mesh)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         abstract_state, shardings)
    batch = {k: jax.ShapeDtypeStruct((8, 32), np.float32 if k == "weights" else np.int32)
             for k in ("inputs", "targets", "weights", "segment_ids", "positions")}
    step = jax.jit(step_lib.make_train_step(graphdef, optimizer, cfg.train))
    with jax.set_mesh(mesh):
      return step.lower(state, batch).as_text()

  assert "collective_permute" in lowered(MESHES["pp4"])
  assert "collective_permute" not in lowered(dict(data=4))


def test_bf16_pipeline_trains_like_bf16_single_device():
  """bf16 compute through the pipeline (its float32 hand-offs are exact for bf16 values)."""
  def run(mesh, n):
    cfg = tiny_experiment(model=dict(MODEL, dtype="bfloat16"),
                          train=dict(batch_size=8, seq_len=32, microbatches=4),
                          mesh={"data": 1, "fsdp": 1, "tensor": 1, **mesh})
    return _train(cfg, jax.devices()[:n])[1]

  np.testing.assert_allclose(run(dict(stage=2), 2), run({}, 1), rtol=1e-3)


@pytest.mark.parametrize("position_encoding", ["rope", "alibi"])
def test_pallas_attention_under_a_mesh_trains_like_single_device_xla(position_encoding):
  """The flash kernel is wrapped in shard_map per batch / head shard (inside the pipeline too;
  ALiBi's slopes split with the heads)."""
  model = dict(MODEL, n_heads=4, n_kv_heads=2, head_dim=64, position_encoding=position_encoding)

  def run(mesh, n, impl):
    cfg = tiny_experiment(model=dict(model, attention_impl=impl),
                          train=dict(batch_size=8, seq_len=32, microbatches=2),
                          mesh={"data": 1, "fsdp": 1, "tensor": 1, **mesh})
    return _train(cfg, jax.devices()[:n])[1]

  want = run({}, 1, "xla")
  np.testing.assert_allclose(run(dict(fsdp=2, tensor=2, stage=2), 8, "pallas"), want, rtol=1e-5)
  np.testing.assert_allclose(run(dict(data=2, fsdp=2, tensor=2), 8, "pallas"), want, rtol=1e-5)


def test_four_stage_circular_pipeline_equals_single_device():
  """8 layers in 4 stages x 2 chunks (each stage holds layers s and s + 4)."""
  def run(mesh, n, chunks):
    cfg = tiny_experiment(model=dict(MODEL, n_layers=8),
                          train=dict(batch_size=8, seq_len=32, microbatches=4,
                                     pipeline_chunks=chunks),
                          mesh={"data": 1, "fsdp": 1, "tensor": 1, **mesh})
    return _train(cfg, jax.devices()[:n])

  (state, losses), (want_state, want_losses) = run(dict(stage=4), 4, 2), run({}, 1, 1)
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
  for got, ref in zip(jax.tree.leaves(jax.device_get(state["params"])),
                      jax.tree.leaves(jax.device_get(want_state["params"]))):
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= 1e-5
