"""Pruning: exact sparsity and N:M patterns per output, SparseGPT against magnitude and Wanda on
its own objective, joint quantization, the whole-model walk, and the CLI's checkpoint through
load, orbax and the Hugging Face export."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import jaxllm
from jaxllm.checkpoint import convert
from jaxllm.model import transformer
from jaxllm.quant import gptq, pruning, sparsity
from jaxllm.quant import params as qparams
from jaxllm.quant import tensor as qtensor
from jaxllm.train import loop
from tests.helpers import REPO, greedy_by_full_forward, tiny_experiment, tiny_model

HALF = sparsity.Target(sparsity=0.5)
TWO_FOUR = sparsity.Target(n=2, m=4)


def _layer(seed, n=2048, width=128, outputs=48):
  """Correlated inputs with a few large channels (as real activations have) and a weight."""
  rng = np.random.default_rng(seed)
  mix = rng.standard_normal((width, width)) * 0.3 + np.eye(width)
  salient = 1 + 4 * (rng.random(width) < 0.05)
  x = rng.standard_normal((n, width)) @ mix * salient
  return x, rng.standard_normal((width, outputs)) * 0.05


def _pruned(method, x, w, target):
  h = gptq.hessian(x)
  if method == "magnitude":
    mask = sparsity.magnitude(w, target)
    return mask, np.where(mask, 0.0, w)
  if method == "wanda":
    mask = sparsity.wanda(w, h, target)
    return mask, np.where(mask, 0.0, w)
  return sparsity.sparsegpt(w, h, target)


@pytest.mark.parametrize("method", pruning.METHODS)
def test_each_method_reaches_the_exact_sparsity_or_pattern_per_output(method):
  x, w = _layer(0, width=100)
  mask, pruned = _pruned(method, x, w, sparsity.Target(sparsity=0.3))
  np.testing.assert_array_equal(mask.sum(axis=0), 30)  # every output: 30 of its 100 inputs
  np.testing.assert_array_equal(pruned[mask], 0.0)
  assert np.all(pruned[~mask] != 0)
  mask, pruned = _pruned(method, x, w, TWO_FOUR)
  groups = (pruned == 0).reshape(25, 4, -1).sum(axis=1)
  np.testing.assert_array_equal(groups, 2)  # two zeros in every 4 consecutive inputs
  np.testing.assert_array_equal(mask, pruned == 0)


def test_wanda_weighs_magnitudes_by_input_norms():
  """A weight on a silent input goes before a larger one on a loud input; with equal input
  norms Wanda is magnitude pruning."""
  w = np.array([[1.0], [0.5]])
  h = np.diag([0.01, 4.0])
  np.testing.assert_array_equal(sparsity.wanda(w, h, HALF)[:, 0], [True, False])
  np.testing.assert_array_equal(sparsity.magnitude(w, HALF)[:, 0], [False, True])
  x, w = _layer(1)
  np.testing.assert_array_equal(sparsity.wanda(w, np.eye(128), HALF),
                                sparsity.magnitude(w, HALF))


@pytest.mark.parametrize("target", [HALF, TWO_FOUR], ids=["50%", "2:4"])
def test_sparsegpt_lowers_the_layer_output_error(target):
  x, w = _layer(2)
  errors = {m: gptq.layer_error(x, w, _pruned(m, x, w, target)[1]) for m in pruning.METHODS}
  assert errors["sparsegpt"] < 0.7 * errors["magnitude"], errors
  assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


def test_sparsegpt_keeps_the_weight_with_nothing_to_prune_and_no_correlation():
  x, w = _layer(3)
  _, same = sparsity.sparsegpt(w, gptq.hessian(x), sparsity.Target(sparsity=0.0))
  np.testing.assert_allclose(same, w, atol=1e-12)
  # H = I: no input can compensate another, so SparseGPT prunes by magnitude and moves nothing.
  mask, pruned = sparsity.sparsegpt(w, np.eye(128), HALF, damp=0.0)
  np.testing.assert_array_equal(mask, sparsity.magnitude(w, HALF))
  np.testing.assert_allclose(pruned, np.where(mask, 0.0, w), atol=1e-12)


def test_joint_int4_keeps_zeros_and_beats_prune_then_round():
  x, w = _layer(4)
  mask, (q, s, z) = sparsity.sparsegpt(w, gptq.hessian(x), TWO_FOUR, bits=4, group_size=32)
  joint = np.asarray(qtensor.from_integers(q, s, z, bits=4, group_size=32, shape=w.shape,
                                           in_axes=1).dequantize())
  np.testing.assert_array_equal(joint[mask], 0.0)
  np.testing.assert_array_equal((joint == 0).reshape(32, 4, -1).sum(axis=1) >= 2, True)
  _, pruned = sparsity.sparsegpt(w, gptq.hessian(x), TWO_FOUR)
  rounded = np.asarray(qtensor.quantize(jnp.asarray(pruned, jnp.float32), bits=4,
                                        group_size=32).dequantize())
  assert gptq.layer_error(x, w, joint) < gptq.layer_error(x, w, rounded)


def test_spec_refuses_bad_targets():
  for kwargs, message in [(dict(method="obs"), "method='obs'"),
                          (dict(sparsity=1.0), "sparsity=1.0 must be in"),
                          (dict(pattern="4:4"), "pattern 4:4 must keep"),
                          (dict(pattern="2-4"), "pattern '2-4' is not N:M"),
                          (dict(method="wanda", bits=4), "joint quantization")]:
    with pytest.raises(ValueError, match=message):
      pruning.PruneSpec(**kwargs)


@pytest.mark.parametrize("method", pruning.METHODS)
def test_prune_model_prunes_every_block_weight_and_stays_close(method):
  cfg = tiny_model(dtype="float32", d_model=64, head_dim=16, d_ff=128)
  graphdef, params = transformer.split(transformer.create(cfg, 0))
  rows = np.random.default_rng(0).integers(3, cfg.vocab_size, (8, 32)).astype(np.int32)
  pruned, spec = pruning.prune_model(graphdef, params, pruning.PruneSpec(method, pattern="2:4"),
                                     rows, progress=False)
  flat = qparams.flatten(pruned)
  assert sorted(spec.measured) == sorted(p for p in flat if p in pruning.PRUNABLE)
  for path, per_layer in spec.measured.items():
    assert per_layer == [0.5] * cfg.n_layers, (path, per_layer)
  np.testing.assert_array_equal(flat["embed"], qparams.flatten(params)["embed"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("prune"))
  loop.train(tiny_experiment(train=dict(steps=4, checkpoint_every=4)), workdir, progress=False)
  return workdir


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "jaxllm.prune", *args, "--progress=false",
                         "--calib_rows=4", "--calib_len=32", f"--calib_data={REPO}/jaxllm/quant"],
                        cwd=REPO, capture_output=True, text=True, timeout=600)


def test_pruned_checkpoint_loads_exports_and_reports_its_sparsity(trained, tmp_path):
  out = tmp_path / "sparse"
  proc = _cli(f"--checkpoint={trained}", f"--out={out}", "--method=sparsegpt", "--sparsity=0.5")
  assert proc.returncode == 0, proc.stderr
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report["sparsity_by_weight"]["blocks/mlp/down"] == 0.5
  spec = pruning.PruneSpec.load(str(out))
  assert spec.method == "sparsegpt" and spec.measured["blocks/attn/q"] == [0.5, 0.5]
  model = jaxllm.load(str(out))
  down = np.asarray(model.params["blocks"]["mlp"]["down"])
  assert np.mean(down == 0) == 0.5
  assert (model.generate("def f(x):", max_tokens=4)
          == greedy_by_full_forward(model, "def f(x):", 4))
  convert.export_hf(convert.read_checkpoint(str(out)), str(tmp_path / "hf"))
  again = jaxllm.load(str(tmp_path / "hf"))
  np.testing.assert_array_equal(np.asarray(again.params["blocks"]["mlp"]["down"]) == 0,
                                down == 0)
  ids = [[model.tokenizer.bos_id, *model.tokenizer.encode("import os")]]
  np.testing.assert_allclose(again.logits(ids), model.logits(ids), atol=1e-5)


def test_joint_cli_writes_a_quantized_sparse_checkpoint_and_errors_are_one_line(trained,
                                                                                tmp_path):
  out = tmp_path / "q"
  proc = _cli(f"--checkpoint={trained}", f"--out={out}", "--pattern=2:4", "--bits=4",
              "--group_size=16")
  assert proc.returncode == 0, proc.stderr
  model = jaxllm.load(str(out))
  q = model.params["blocks"]["mlp"]["up"]
  assert qtensor.is_qtensor(q) and q.bits == 4
  zeros = np.asarray(q.dequantize()) == 0
  assert np.all(zeros.reshape(*zeros.shape[:1], -1, 4, zeros.shape[-1]).sum(axis=2) >= 2)
  occupied = tmp_path / "full"
  occupied.mkdir()
  (occupied / "keep.txt").write_text("precious")
  for args, message in [([f"--out={occupied}"], "not empty"),
                        ([f"--out={tmp_path / 'a'}", "--pattern=3:2"], "must keep 0 < N < M"),
                        ([f"--out={tmp_path / 'b'}", "--method=magnitude", "--bits=4"],
                         "joint quantization"),
                        ([f"--out={tmp_path / 'c'}", f"--checkpoint={out}"], "is quantized")]:
    proc = _cli(f"--checkpoint={trained}", *args)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert message in proc.stderr, proc.stderr
  assert not os.path.exists(tmp_path / "a")
  assert (occupied / "keep.txt").read_text() == "precious"
