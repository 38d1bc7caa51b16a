"""LoRA adapters (`jaxllm.lora`) against references written here in numpy: the adapted model's
logits equal the base weights plus scale * a @ b formed in numpy, merging changes no logit,
a quantized base (QLoRA) computes with its dequantized weights plus the update, gradients reach
the adapters as they would through the merged weight, and cached decoding (the layer views, the
CPU kernel's path) agrees with the merged model."""

import dataclasses
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

from jaxllm.inference import generate as gen
from jaxllm.inference import sampling
from jaxllm.lora import adapters, peft_format
from jaxllm.lora.weight import LoraWeight
from jaxllm.model import transformer
from jaxllm.ops import quant_matmul
from jaxllm.quant import params as qparams
from jaxllm.quant import tensor as qtensor
from tests.helpers import lora_with_updates, tiny_model, xla_flags

TOKENS = jnp.array([[3, 17, 40, 5, 9, 22, 31, 2], [1, 8, 8, 60, 12, 4, 50, 7]])


def _model(**overrides):
  return transformer.split(transformer.create(tiny_model(init_std=0.4, **overrides), 1))


def _numpy_merged(lora_params):
  """Plain params: each LoraWeight's base (dequantized) + scale * a @ b, per layer in numpy."""
  out = {}
  for path, w in qparams.flatten(lora_params).items():
    if not isinstance(w, LoraWeight):
      out[path] = w
      continue
    base = np.asarray(w.base.astype(jnp.float32), np.float64)
    a, b = np.asarray(w.a, np.float64), np.asarray(w.b, np.float64)
    layers = []
    for i in range(base.shape[0]):
      r = a.shape[-1]
      delta = a[i].reshape(-1, r) @ b[i].reshape(r, -1)
      layers.append(base[i] + w.scale * delta.reshape(base[i].shape))
    out[path] = jnp.asarray(np.stack(layers), jnp.float32)
  return qparams.unflatten(out)


def _logits(graphdef, params):
  return nnx.merge(graphdef, params).forward(TOKENS)[0]


class ProjectTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_project_adds_scale_times_x_a_b_to_the_base_product(self):
    rng = np.random.default_rng(0)
    # A [D] -> [H, Dh] projection (in_axes 1) and [H, Dh] -> [D] (in_axes 2), float and int8.
    for in_shape, out_shape in (((16,), (4, 8)), ((4, 8), (16,))):
      in_axes = len(in_shape)
      x = rng.normal(size=(3, 5, *in_shape)).astype(np.float32)
      base = rng.normal(size=(*in_shape, *out_shape)).astype(np.float32)
      a = rng.normal(size=(*in_shape, 2)).astype(np.float32)
      b = rng.normal(size=(2, *out_shape)).astype(np.float32)
      for quantized in (False, True):
        w = qtensor.quantize(jnp.asarray(base), bits=8, in_axes=in_axes) if quantized else base
        dense = np.asarray(w.astype(jnp.float32) if quantized else base, np.float64)
        lw = LoraWeight(w, jnp.asarray(a), jnp.asarray(b), 0.5, in_axes)
        got = self.variant(lambda x, lw: quant_matmul.project(x, lw, in_axes))(x, lw)
        x2 = x.reshape(15, -1).astype(np.float64)
        want = x2 @ dense.reshape(x2.shape[1], -1) + 0.5 * (x2 @ a.reshape(x2.shape[1], 2)) @ (
            b.reshape(2, -1))
        np.testing.assert_allclose(np.asarray(got).reshape(15, -1), want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_logits_equal_base_plus_scaled_update_in_numpy(rslora):
  graphdef, params = _model()
  cfg = adapters.LoraConfig(rank=4, alpha=8.0, rslora=rslora)
  lora = lora_with_updates(params, cfg)
  assert sorted(adapters.adapters(lora)) == sorted(
      f"blocks/{p}" for p in adapters.TARGETS.values())
  assert adapters.config_of(lora) == (4, 8.0 / (2.0 if rslora else 4.0))
  got = jax.jit(lambda p: _logits(graphdef, p))(lora)
  want = _logits(graphdef, _numpy_merged(lora))
  # float32 logits of size ~3 through two association orders ((x @ a) @ b vs x @ (a @ b)).
  np.testing.assert_allclose(got, want, atol=3e-5, rtol=1e-5)
  # Fresh adapters (b = 0) leave the model as it was.
  np.testing.assert_allclose(_logits(graphdef, adapters.add(params, cfg)),
                             _logits(graphdef, params), atol=1e-6)


def test_merged_weights_give_the_adapted_logits():
  graphdef, params = _model()
  lora = lora_with_updates(params, adapters.LoraConfig(targets=("q", "v", "down"), rank=2))
  merged = adapters.merge(lora)
  chex.assert_trees_all_equal_shapes_and_dtypes(merged, params)
  np.testing.assert_allclose(_logits(graphdef, merged), _logits(graphdef, lora), atol=1e-5)


def test_quantized_base_computes_with_its_dequantized_weights_plus_the_update():
  graphdef, params = _model()
  qp, _ = qparams.quantize_params(params, qparams.QuantSpec(bits=4, group_size=16))
  lora = lora_with_updates(qp, adapters.LoraConfig(rank=4))
  assert all(qtensor.is_qtensor(w.base) for w in qparams.flatten(lora).values()
             if isinstance(w, LoraWeight))
  np.testing.assert_allclose(_logits(graphdef, lora), _logits(graphdef, _numpy_merged(lora)),
                             atol=1e-5, rtol=1e-5)


def test_adapter_gradients_equal_those_through_the_merged_weight():
  graphdef, params = _model()
  lora = lora_with_updates(params, adapters.LoraConfig(rank=3))
  ab = adapters.adapters(lora)

  def loss_two_paths(ab):  # x @ base + scale * (x @ a) @ b, as the model runs
    return jnp.mean(_logits(graphdef, adapters.with_adapters(lora, ab)) ** 2)

  def loss_merged(ab):  # the plain weight base + scale * a @ b, formed first
    flat = qparams.flatten(params)
    for path, w in qparams.flatten(lora).items():
      if isinstance(w, LoraWeight):
        flat[path] = dataclasses.replace(w, a=ab[path]["a"], b=ab[path]["b"]).merge()
    return jnp.mean(_logits(graphdef, qparams.unflatten(flat)) ** 2)

  got, want = jax.grad(loss_two_paths)(ab), jax.grad(loss_merged)(ab)
  chex.assert_trees_all_close(got, want, atol=2e-5, rtol=1e-4)  # float32, gradients of ~1
  assert all(float(jnp.abs(g["b"]).max()) > 0 for g in got.values())


def test_cached_decoding_with_adapters_equals_the_merged_model():
  graphdef, params = _model(n_layers=3)
  lora = lora_with_updates(params, adapters.LoraConfig(rank=4), scale=0.5)
  prompts = [[5, 9, 2, 33], [7, 1, 8, 8, 3, 10]]
  requests = [sampling.SamplingParams(max_tokens=8)] * 2
  for cache in ("contiguous", "paged"):
    got = gen.generate_requests(graphdef, lora, prompts, requests, cache=cache)
    want = gen.generate_requests(graphdef, adapters.merge(lora), prompts, requests, cache=cache)
    assert [g.tokens for g in got] == [w.tokens for w in want], cache
    for g, w in zip(got, want):
      np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-4)


def test_bad_adapters_fail_in_one_line():
  graphdef, params = _model()
  with pytest.raises(ValueError, match=r"lora targets \['q', 'qq'\]: each must be one of"):
    adapters.LoraConfig(targets=("q", "qq"))
  with pytest.raises(ValueError, match=r"lora rank=0 must be >= 1"):
    adapters.LoraConfig(rank=0)
  with pytest.raises(ValueError, match=r"rank=40 is larger than blocks/attn/k's dimensions"):
    adapters.add(params, adapters.LoraConfig(rank=40, targets=("k",)))
  lora = adapters.add(params, adapters.LoraConfig(rank=2, targets=("q",)))
  with pytest.raises(ValueError, match=r"already has a LoRA adapter"):
    adapters.add(lora, adapters.LoraConfig(rank=2, targets=("q",)))
  with pytest.raises(ValueError, match=r"adapter blocks/attn/q/a has shape \(2, 32, 3\), the "
                     r"model wants \(2, 32, 2\)"):
    adapters.with_adapters(lora, {"blocks/attn/q": {"a": jnp.zeros((2, 32, 3)),
                                                    "b": jnp.zeros((3, 4, 8))}})
  with pytest.raises(ValueError, match=r"no LoRA adapter at \['blocks/attn/k'\]"):
    adapters.with_adapters(lora, {"blocks/attn/k": {}})


def test_peft_files_round_trip_and_bad_adapters_fail_in_one_line(tmp_path):
  graphdef, params = _model()
  lora = lora_with_updates(params, adapters.LoraConfig(targets=("q", "o", "up"), rank=4))
  peft_format.save(str(tmp_path / "ad"), lora, tiny_model())
  back = peft_format.load(str(tmp_path / "ad"), params, tiny_model())
  chex.assert_trees_all_close(adapters.adapters(back), adapters.adapters(lora), atol=0)
  np.testing.assert_allclose(_logits(graphdef, back), _logits(graphdef, lora), atol=1e-6)
  other = transformer.split(transformer.create(tiny_model(d_model=48), 0))[1]
  with pytest.raises(peft_format.AdapterError, match=r"blocks/\S+ layer 0 lora_A is "
                     r"\(4, 32\), this model wants \(4, 48\) \(an adapter for another base"):
    peft_format.load(str(tmp_path / "ad"), other, tiny_model(d_model=48))
  with pytest.raises(peft_format.AdapterError, match=r"is for layer 1; the model has 1"):
    peft_format.load(str(tmp_path / "ad"), _model(n_layers=1)[1], tiny_model(n_layers=1))
  with pytest.raises(peft_format.AdapterError, match=r"no adapter_config.json"):
    peft_format.load(str(tmp_path), params, tiny_model())
  with pytest.raises(peft_format.AdapterError, match=r"these params hold no LoRA adapter to save"):
    peft_format.save(str(tmp_path / "none"), params, tiny_model())


def test_merge_command_writes_the_adapted_model_and_fails_bad_input_in_one_line(
    tmp_path, tiny_chat_model):
  import jaxllm
  base = jaxllm.load(tiny_chat_model)
  lora = lora_with_updates(base.params, adapters.LoraConfig(rank=2, targets=("q", "down")))
  peft_format.save(str(tmp_path / "ad"), lora, base.config)
  run = lambda *args: subprocess.run(
      [sys.executable, "-m", "jaxllm.lora", *args], capture_output=True, text=True,
      timeout=300, env={**os.environ, "XLA_FLAGS": xla_flags(devices=1)})
  proc = run("merge", f"--checkpoint={tiny_chat_model}", f"--adapter={tmp_path / 'ad'}",
             f"--out={tmp_path / 'merged'}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads(proc.stdout.splitlines()[-1])["merged"] == ["blocks/attn/q", "blocks/mlp/down"]
  ids = [[1, 504, 3027, 42, 9, 17]]
  np.testing.assert_allclose(jaxllm.load(tmp_path / "merged").logits(ids),
                             jaxllm.load(tiny_chat_model, adapter=tmp_path / "ad").logits(ids),
                             atol=5e-4)  # float32 logits of size ~8 in two orders of sums
  bad = run("merge", f"--checkpoint={tiny_chat_model}", f"--adapter={tmp_path}",
            f"--out={tmp_path / 'merged2'}")
  assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
      f"error: {tmp_path}: no adapter_config.json (not a PEFT/jaxllm LoRA adapter)"], bad.stderr
  assert not (tmp_path / "merged2").exists()


def test_an_adapter_on_a_tensor_mesh_gives_one_devices_logits(tmp_path, tiny_chat_model):
  """`jaxllm.load(adapter=, mesh=)`: a and b split like their weight; a tensor axis that does
  not divide the KV heads (whose copies would need copied adapters) is refused in one line."""
  import jaxllm
  from jaxllm.parallel import placement
  base = jaxllm.load(tiny_chat_model)
  lora = lora_with_updates(base.params, adapters.LoraConfig(rank=4), scale=0.5)
  peft_format.save(str(tmp_path / "ad"), lora, base.config)
  ids = [[1, 504, 3027, 42, 9, 17]]
  want = jaxllm.load(tiny_chat_model, adapter=tmp_path / "ad").logits(ids)
  split = jaxllm.load(tiny_chat_model, mesh=placement.parse_mesh("tensor=3"),
                      adapter=tmp_path / "ad")
  np.testing.assert_allclose(split.logits(ids), want, atol=2e-4)
  v = qparams.flatten(split.params)["blocks/attn/v"]
  assert v.b.sharding.spec[2] == "tensor"  # [L, r, K, Dh]: KV heads over the tensor axis
  with pytest.raises(peft_format.AdapterError, match="does not divide the model's 3 KV heads"):
    jaxllm.load(tiny_chat_model, mesh=placement.parse_mesh("tensor=2"), adapter=tmp_path / "ad")


def test_a_server_with_an_adapter_answers_as_the_adapted_model(tmp_path, tiny_chat_model):
  """`serve --adapter` (server.build(adapter=)): the engine's batched, paged decoding of the
  adapted model gives `LoadedModel.generate`'s greedy text, which the adapter changes."""
  pytest.importorskip("fastapi")
  from fastapi.testclient import TestClient

  import jaxllm
  from jaxllm.inference import server as server_lib
  base = jaxllm.load(tiny_chat_model)
  lora = lora_with_updates(base.params, adapters.LoraConfig(rank=4, targets=("q", "v", "down")),
                           scale=1.0)
  peft_format.save(str(tmp_path / "ad"), lora, base.config)
  adapted = jaxllm.load(tiny_chat_model, adapter=tmp_path / "ad")
  prompt = "The capital of"
  want = adapted.generate(prompt, max_tokens=8)
  assert want != base.generate(prompt, max_tokens=8)  # the adapter shows in the text
  app, engine = server_lib.build(tiny_chat_model, adapter=str(tmp_path / "ad"), max_slots=2,
                                 num_pages=16, max_seq_len=128, model_name="m")
  try:
    reply = TestClient(app).post("/v1/completions", json={
        "model": "m", "prompt": prompt, "max_tokens": 8, "temperature": 0})
  finally:
    engine.shutdown()
  assert reply.status_code == 200, reply.text
  assert reply.json()["choices"][0]["text"] == want
