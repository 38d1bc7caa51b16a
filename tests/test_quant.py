"""Weight quantization: storage round trips, error bounds, GPTQ against RTN on its own
objective, AWQ's folding, quantized models against their dequantized weights, and the
`jaxllm.quantize` checkpoint round trip."""

import json
import os
import subprocess
import sys

import chex
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

import jaxllm
from jaxllm.model import transformer
from jaxllm.quant import calibrate, gptq, methods
from jaxllm.quant import params as qparams
from jaxllm.quant import tensor as qtensor
from jaxllm.train import loop
from tests.helpers import tiny_experiment, tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("group_size, rows", [(16, 64), (32, 96), (8, 8)])
def test_int4_pack_unpack_round_trip(group_size, rows):
  q = jnp.asarray(np.random.default_rng(rows).integers(0, 16, (3, rows, 5)), jnp.int32)
  packed = qtensor.pack_int4(q, group_size)
  assert packed.dtype == jnp.uint8 and packed.shape == (3, rows // 2, 5)
  chex.assert_trees_all_equal(qtensor.unpack_int4(packed, group_size), q)


@pytest.mark.parametrize("bits, group_size, symmetric", [
    (8, 0, True), (8, 32, False), (4, 32, True), (4, 64, False), (4, 48, True)])
def test_dequantized_error_is_within_half_a_step(bits, group_size, symmetric):
  rng = np.random.default_rng(bits + group_size)
  w = jnp.asarray(rng.standard_normal((2, 100, 24)), jnp.float32)  # [L, I, O]; 100 rows: ragged
  q = qtensor.quantize(w, bits=bits, group_size=group_size, symmetric=symmetric, batch_axes=1)
  deq = q.dequantize()
  assert deq.shape == w.shape and q.values.dtype == (jnp.int8 if bits == 8 else jnp.uint8)
  g = q.group_size
  step = np.repeat(np.asarray(q.scales), g, axis=1)[:, :100]  # each row's group scale
  assert np.all(np.abs(np.asarray(deq - w)) <= step / 2 + 1e-6)
  # A per-channel int8 tensor is a quarter of the float32 bytes, plus one scale per column.
  if bits == 8 and group_size == 0:
    assert q.nbytes == 2 * 100 * 24 + 2 * 24 * 4


@pytest.mark.parametrize("head_bits, head_group, tied, symmetric", [
    (0, 0, True, True), (8, 0, True, False), (4, 16, True, False), (8, 0, False, True)])
def test_quantized_model_equals_its_dequantized_weights(head_bits, head_group, tied, symmetric):
  """Every path that reads a QTensor (blocks; the embedding's lookup and the tied head's
  integer contraction; an untied head) against the same weights dequantized up front."""
  cfg = tiny_model(dtype="float32", tie_embeddings=tied, d_model=36)  # 36: ragged int4 head groups of 16
  graphdef, params = transformer.split(transformer.create(cfg, 0))
  qp, spec = qparams.quantize_params(params, qparams.QuantSpec(
      bits=4, group_size=12, symmetric=symmetric, head_bits=head_bits,
      head_group_size=head_group))
  heads = {"embed"} | ({"lm_head"} if not tied else set()) if head_bits else set()
  assert set(spec.quantized) == {f"blocks/{n}" for n in methods.INPUT_OF} | heads
  if head_bits:
    embed = qp["embed"]
    groups = 1 if head_group == 0 else -(-cfg.d_model // head_group)
    assert embed.bits == head_bits and embed.scales.shape == (cfg.vocab_size, groups, 1)
  dequantized = jax.tree.map(lambda x: x.dequantize() if qtensor.is_qtensor(x) else x, qp,
                             is_leaf=qtensor.is_qtensor)
  forward = jax.jit(lambda p, ids: nnx.merge(graphdef, p)(ids))
  ids = jnp.arange(24, dtype=jnp.int32).reshape(2, 12) % cfg.vocab_size
  chex.assert_trees_all_close(forward(qp, ids), forward(dequantized, ids), atol=1e-6)
  assert qtensor.tree_nbytes(qp) < qtensor.tree_nbytes(params) / 2


def _correlated_inputs(seed, n=2048, width=128):
  rng = np.random.default_rng(seed)
  mix = rng.standard_normal((width, width)) * 0.3 + np.eye(width)
  salient = 1 + 4 * (rng.random(width) < 0.05)  # a few large channels, as in real activations
  return rng.standard_normal((n, width)) @ mix * salient, rng


@pytest.mark.parametrize("bits, group_size, symmetric, act_order", [
    (4, 32, True, False), (4, 64, False, False), (4, 0, True, False), (8, 0, True, False),
    (4, 32, True, True)])
def test_gptq_beats_round_to_nearest_on_its_objective(bits, group_size, symmetric, act_order):
  x, rng = _correlated_inputs(bits + group_size)
  w = rng.standard_normal((128, 48)) * 0.05
  q, s, z = gptq.gptq_quantize(w, gptq.hessian(x), bits=bits, group_size=group_size,
                               symmetric=symmetric, act_order=act_order)
  g = qtensor.group_size_for(128, group_size)
  ours = qtensor.from_integers(q, s, z, bits=bits, group_size=g, shape=(128, 48), in_axes=1)
  rtn = qtensor.quantize(jnp.asarray(w, jnp.float32), bits=bits, group_size=group_size,
                         symmetric=symmetric)
  e_gptq = gptq.layer_error(x, w, np.asarray(ours.dequantize()))
  e_rtn = gptq.layer_error(x, w, np.asarray(rtn.dequantize()))
  assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)


def test_gptq_without_correlation_or_error_is_round_to_nearest():
  """With H = I no column can compensate another: GPTQ must reduce to RTN exactly."""
  w = np.random.default_rng(0).standard_normal((64, 16))
  q, s, _ = gptq.gptq_quantize(w, np.eye(64), bits=8, group_size=0, damp=0.0)
  rtn = qtensor.quantize(jnp.asarray(w, jnp.float32), bits=8)
  np.testing.assert_array_equal(q, np.asarray(rtn.int_values()))
  np.testing.assert_allclose(s[0], np.asarray(rtn.scales)[0], rtol=1e-6)


# OLMo 2's block: norms after attention and MLP, q/k norms over all heads.
POST_NORM = dict(norm_placement="post", qk_norm=True, qk_norm_over_heads=True)
# Gemma's: sandwich norms scaling by (1 + w), GeGLU, local and global layers.
GEMMA = dict(norm_placement="sandwich", norm_offset=1.0, embed_scale=True,
             mlp_activation="gelu_tanh", global_every=2, sliding_window=4, rope_local_theta=100.0)


@pytest.mark.parametrize("variant", [{}, POST_NORM, GEMMA])
def test_calibration_block_matches_the_model_block(variant):
  cfg = tiny_model(dtype="float32", **variant)
  graphdef, params = transformer.split(transformer.create(cfg, 3))
  bgd = calibrate.block_graphdef(graphdef, params)
  lp = calibrate.layer_params(params["blocks"], 1)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 10, cfg.d_model))
  out, inputs = calibrate.run_block(bgd, lp, x, 1)
  positions = jnp.broadcast_to(jnp.arange(10), (2, 10))
  chex.assert_trees_all_close(out, nnx.merge(bgd, lp)(x, positions, None, 1)[0], atol=1e-6)
  assert inputs.down.shape == (20, cfg.d_ff) and inputs.o.shape == (20, cfg.n_heads *
                                                                     cfg.head_dim)


# GQA (o left alone), MHA (o folded into v), post-norm (nothing produces q/k/v's or gate/up's
# input but the residual stream: only o (MHA) and down are scaled), and Gemma (scales folded
# into norms of (1 + w)).
@pytest.mark.parametrize("kv_heads, variant", [(2, {}), (4, {}), (4, POST_NORM), (2, GEMMA)])
def test_awq_scaling_keeps_the_float_model(kv_heads, variant):
  cfg = tiny_model(dtype="float32", n_kv_heads=kv_heads, **variant)
  graphdef, params = transformer.split(transformer.create(cfg, 1))
  rows = np.asarray(jax.random.randint(jax.random.PRNGKey(2), (8, 16), 0, cfg.vocab_size))
  spec = qparams.QuantSpec(bits=4, group_size=16, method="awq")
  scaled, ratios = methods._awq_scale(graphdef, params, spec, rows, chunk_rows=4,
                                      progress=False)
  scaled_groups = ("attn/q", "attn/k", "attn/v", "mlp/gate", "mlp/up", "mlp/down")
  if variant is POST_NORM:
    scaled_groups = ("mlp/down",)
  assert set(ratios) == {f"blocks/{n}" for n in scaled_groups} | (
      {"blocks/attn/o"} if kv_heads == 4 else set())
  assert all(float(r.min()) >= 0.5 and float(r.max()) <= 1.0 for r in ratios.values())
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.allclose(a, b), scaled, params))
  assert any(changed)  # something was folded
  forward = jax.jit(lambda p, ids: nnx.merge(graphdef, p)(ids))
  ids = jnp.asarray(rows[:2])
  chex.assert_trees_all_close(forward(scaled, ids), forward(params, ids), atol=2e-5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("quant"))
  loop.train(tiny_experiment(train=dict(steps=4, checkpoint_every=4)), workdir, progress=False)
  return workdir


@pytest.mark.parametrize("method, bits, mesh, head_bits", [
    ("rtn", 8, "", 8), ("gptq", 4, "", 0), ("awq", 4, "tensor=2", 4)])
def test_quantize_cli_writes_a_checkpoint_load_reads(trained, tmp_path, method, bits, mesh,
                                                     head_bits):
  out = str(tmp_path / "q")
  proc = subprocess.run(
      [sys.executable, "-m", "jaxllm.quantize", f"--checkpoint={trained}", f"--out={out}",
       f"--method={method}", f"--bits={bits}", "--group_size=16", "--calib_rows=4",
       "--calib_len=32", f"--calib_data={REPO}/jaxllm/quant", "--progress=false",
       f"--head_bits={head_bits}", "--head_group_size=16",
       *([f"--mesh={mesh}"] if mesh else [])],  # AWQ's calibration on a tensor=2 mesh
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report["memory_bytes_after"] < report["memory_bytes_before"]
  # From a float training workdir the output is smaller, and no size note is printed.
  assert "is larger than its source" not in proc.stderr
  model = jaxllm.load(out)
  q = model.params["blocks"]["mlp"]["down"]
  assert qtensor.is_qtensor(q) and q.bits == bits and q.group_size == 16
  embed = model.params["embed"]  # [V, D], each row in groups of 16
  assert qtensor.is_qtensor(embed) == bool(head_bits)
  if head_bits:
    assert embed.bits == head_bits and embed.scales.shape[:2] == (
        model.config.vocab_size, model.config.d_model // 16)
  original = jaxllm.load(trained)
  ids = [[original.tokenizer.bos_id, *original.tokenizer.encode("def f(x): return x")]]
  # Close to the float model; exactly the in-memory dequantized weights' logits.
  dequantized = jax.tree.map(lambda x: x.dequantize() if qtensor.is_qtensor(x) else x,
                             model.params, is_leaf=qtensor.is_qtensor)
  forward = jax.jit(lambda p, ids: nnx.merge(model.graphdef, p)(ids))
  chex.assert_trees_all_close(model.logits(ids), forward(dequantized, jnp.asarray(ids)),
                              atol=1e-5)
  drift = float(jnp.abs(jax.nn.log_softmax(model.logits(ids)) -
                        jax.nn.log_softmax(original.logits(ids))).mean())
  # Measured (jax 0.12, 2026-12-06): rtn8 0.0006, gptq4 0.0019, awq4 with a 4-bit head 0.011;
  # zeroing every block weight drifts 0.046, so a CLI that wrote zeros fails each limit.
  assert drift < (0.005 if bits == 8 else 0.01 if head_bits == 0 else 0.025), drift
  # Greedy text through the quantized checkpoint is the float model's.
  assert model.generate("def f(x):", max_tokens=4) == original.generate("def f(x):", max_tokens=4)


def test_quantize_cli_errors_are_one_line(trained, tmp_path):
  occupied = tmp_path / "full"
  occupied.mkdir()
  (occupied / "keep.txt").write_text("precious")
  for args, message in [([f"--out={occupied}"], "not empty"),
                        ([f"--out={tmp_path / 'x'}", "--bits=4", "--group_size=15"], "even"),
                        ([f"--out={tmp_path / 'y'}", "--exclude=blocks/.*"], "nothing to")]:
    proc = subprocess.run([sys.executable, "-m", "jaxllm.quantize", f"--checkpoint={trained}",
                           *args, "--progress=false"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert message in proc.stderr, proc.stderr
  assert (occupied / "keep.txt").read_text() == "precious"
  assert not os.path.exists(tmp_path / "y")  # a failed run leaves nothing behind


def test_spec_validation():
  with pytest.raises(ValueError, match="bits=3"):
    qparams.QuantSpec(bits=3)
  with pytest.raises(ValueError, match="method"):
    qparams.QuantSpec(method="magic")
  with pytest.raises(ValueError, match="exclude pattern"):
    qparams.QuantSpec(exclude=("(",))


def test_fake_quant_rounds_forward_and_passes_gradients_through():
  from jaxllm.quant import fake
  w = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 8))
  kw = dict(bits=4, group_size=16, in_axes=1, batch_axes=1)
  rounded = fake.fake_quant(w, **kw)
  chex.assert_trees_all_close(rounded, qtensor.quantize(w, **kw).dequantize(), atol=1e-6)
  weights = jnp.broadcast_to(jnp.arange(8.0), w.shape)
  grad = jax.grad(lambda w: jnp.sum(fake.fake_quant(w, **kw) * weights))(w)
  chex.assert_trees_all_close(grad, weights)


def test_quantization_aware_training_step_sees_rounded_weights():
  """With train.qat_bits the step's loss is the loss of the int4-rounded weights (and not of
  the float ones), while the update still changes the float weights."""
  import optax
  from jaxllm import config as config_lib
  from jaxllm.train import step as step_lib
  cfg = tiny_experiment(train=dict(qat_bits=4, qat_group_size=16))
  config_lib.validate(cfg)
  graphdef, params = transformer.split(transformer.create(cfg.model, 0))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, cfg.model.vocab_size, (2, 17)), jnp.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "positions": jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (2, 16)),
           "segment_ids": jnp.ones((2, 16), jnp.int32), "weights": jnp.ones((2, 16))}
  optimizer = optax.sgd(0.1)
  state = step_lib.init_state(params, optimizer, 0)
  new_state, metrics = jax.jit(step_lib.make_train_step(graphdef, optimizer, cfg.train))(
      state, batch)
  rounded, _ = qparams.quantize_params(params, qparams.QuantSpec(bits=4, group_size=16))
  rounded = jax.tree.map(lambda x: x.dequantize() if qtensor.is_qtensor(x) else x, rounded,
                         is_leaf=qtensor.is_qtensor)
  loss = lambda p: step_lib.batch_loss(graphdef, p, batch)[1][:2]
  nll_q, w = loss(rounded)
  nll_f, _ = loss(params)
  assert float(metrics["loss"]) == pytest.approx(float(nll_q / w), rel=1e-5)
  assert abs(float(nll_f / w) - float(metrics["loss"])) > 1e-4
  assert not np.allclose(new_state["params"]["blocks"]["mlp"]["up"],
                         params["blocks"]["mlp"]["up"])
  with pytest.raises(config_lib.ConfigError, match="qat_bits"):
    config_lib.validate(tiny_experiment(train=dict(qat_bits=3)))


@pytest.mark.parametrize("symmetric", [True, False])
def test_clip_search_never_rounds_worse(symmetric):
  w = jnp.asarray(np.random.default_rng(5).standard_t(3, (256, 32)), jnp.float32)  # heavy tails
  err = lambda **kw: np.asarray(jnp.sum((qtensor.quantize(
      w, bits=4, group_size=64, symmetric=symmetric, **kw).dequantize() - w) ** 2, axis=0))
  plain, clipped = err(), err(clip_search=True)
  assert np.all(clipped <= plain + 1e-6) and clipped.sum() < 0.97 * plain.sum()


@pytest.mark.parametrize("symmetric, in_axes, rows", [(True, 1, 100), (False, 2, 64)])
def test_int4_projection_by_halves_equals_dequantize_then_dot(symmetric, in_axes, rows):
  from jaxllm.ops import quant_matmul as matmul
  rng = np.random.default_rng(rows)
  shape = (rows, 24) if in_axes == 1 else (4, rows // 4, 24)
  w = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  q = qtensor.quantize(w, bits=4, group_size=32, symmetric=symmetric, in_axes=in_axes)
  x = jnp.asarray(rng.standard_normal((2, 3, *shape[:in_axes])), jnp.float32)
  want = jnp.tensordot(x, q.dequantize(), axes=in_axes)
  got = matmul.project(x, q, in_axes)
  assert got.shape == (2, 3, 24)
  chex.assert_trees_all_close(got, want, atol=1e-4, rtol=1e-5)


def test_a_quantized_output_larger_than_its_source_is_noted():
  from jaxllm.quant.disk_size import larger_output_note
  assert larger_output_note(94 * 2**20, 60 * 2**20, 8) is None
  # int8 of SmolLM2-135M's Q4_1 GGUF: 94 -> 176 MB.
  note = larger_output_note(94 * 2**20, 176 * 2**20, 8)
  assert note.startswith("note: the int8 output (176.0 MiB) is larger than its source "
                         "(94.0 MiB)") and "4-bit GGUF" in note
