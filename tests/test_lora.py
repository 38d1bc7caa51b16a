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
from jaxllm.lora import adapters, bank, peft_format
from jaxllm.lora.weight import LoraBank, LoraWeight
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

  @chex.variants(with_jit=True, without_jit=True)
  def test_dropout_masks_the_adapters_input_alone(self):
    """LoRA dropout (training): `x @ base + scale * ((x * m / (1 - p)) @ a) @ b` with m the
    key's Bernoulli(1 - p) mask; the base's product sees all of x."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 5, 16)).astype(np.float32)
    base = rng.normal(size=(16, 12)).astype(np.float32)
    a = rng.normal(size=(16, 2)).astype(np.float32)
    b = rng.normal(size=(2, 12)).astype(np.float32)
    key = jax.random.key_data(jax.random.key(4))
    lw = LoraWeight(jnp.asarray(base), jnp.asarray(a), jnp.asarray(b), 0.5, 1,
                    dropout_key=key, dropout=0.25)
    got = self.variant(lambda x, lw: quant_matmul.project(x, lw))(x, lw)
    m = np.asarray(jax.random.bernoulli(jax.random.wrap_key_data(key), 0.75, x.shape))
    assert 0.6 < m.mean() < 0.9
    x64 = x.astype(np.float64)
    want = x64 @ base + 0.5 * ((x64 * m / 0.75) @ a) @ b
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_a_bank_gives_each_row_its_own_adapter(self):
    """`LoraBank.rows(ids)`: row i of the batch gets base + adapter ids[i] (slot 0: zeros),
    against numpy, for both projection layouts."""
    rng = np.random.default_rng(1)
    for in_shape, out_shape in (((16,), (4, 8)), ((4, 8), (16,))):
      in_axes = len(in_shape)
      x = rng.normal(size=(3, 5, *in_shape)).astype(np.float32)
      base = rng.normal(size=(*in_shape, *out_shape)).astype(np.float32)
      a = rng.normal(size=(3, *in_shape, 2)).astype(np.float32)
      b = rng.normal(size=(3, 2, *out_shape)).astype(np.float32)
      a[0], b[0] = 0, 0
      ids = np.array([2, 0, 1], np.int32)
      bank = LoraBank(jnp.asarray(base), jnp.asarray(a), jnp.asarray(b), in_axes)
      got = self.variant(lambda x, bank, ids: quant_matmul.project(x, bank.rows(ids), in_axes))(
          x, bank, ids)
      for row, slot in enumerate(ids):
        x2 = x[row].reshape(5, -1).astype(np.float64)
        want = x2 @ base.reshape(x2.shape[1], -1) + (x2 @ a[slot].reshape(-1, 2)) @ (
            b[slot].reshape(2, -1))
        np.testing.assert_allclose(np.asarray(got[row]).reshape(5, -1), want, atol=1e-4,
                                   rtol=1e-5)


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


def test_dropout_keys_differ_per_weight_and_layer_and_rate_zero_changes_nothing():
  graphdef, params = _model()
  lora = adapters.add(params, adapters.LoraConfig(rank=2, targets=("q", "v")))
  assert adapters.with_dropout(lora, jax.random.PRNGKey(0), 0.0) is lora
  dropped = qparams.flatten(adapters.with_dropout(lora, jax.random.PRNGKey(0), 0.1))
  keys = [np.asarray(w.dropout_key) for w in dropped.values() if isinstance(w, LoraWeight)]
  assert len(keys) == 2 and all(k.shape == (2, 2) for k in keys)  # [L, key]
  rows = {tuple(r) for k in keys for r in k}
  assert len(rows) == 4  # two weights x two layers, all different
  # Training sees different logits under dropout; evaluation (no keys) the plain model's.
  with_b = lora_with_updates(params, adapters.LoraConfig(rank=2, targets=("q", "v")))
  train = adapters.with_dropout(with_b, jax.random.PRNGKey(1), 0.5)
  assert not np.allclose(_logits(graphdef, train), _logits(graphdef, with_b))


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
  """`jaxllm.load(adapter=, mesh=)`: a and b split like their weight (one adapter, or a bank of
  them); a tensor axis that does not divide the KV heads (whose copies would need copied
  adapters) is refused in one line."""
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
  # A bank of adapters (multi-LoRA serving) splits the same way, its adapter axis whole.
  banked = jaxllm.load(tiny_chat_model, mesh=placement.parse_mesh("tensor=3"),
                       adapter=[tmp_path / "ad", tmp_path / "ad"])
  v = qparams.flatten(banked.params)["blocks/attn/v"]
  assert v.b.shape[1] == 3 and v.b.sharding.spec[3] == "tensor"  # [L, slots, r, K, Dh]
  rows = bank.select(banked.params, jnp.asarray([2], jnp.int32))
  np.testing.assert_allclose(nnx.merge(banked.graphdef, rows)(jnp.asarray(ids)), want,
                             atol=2e-4)
  with pytest.raises(peft_format.AdapterError, match="does not divide the model's 3 KV heads"):
    jaxllm.load(tiny_chat_model, mesh=placement.parse_mesh("tensor=2"), adapter=tmp_path / "ad")


def test_servers_answer_with_one_adapter_or_the_one_each_request_names(tmp_path,
                                                                        tiny_chat_model):
  """`serve --adapter=DIR` (server.build(adapter=)): every request gets the adapted model's
  greedy text (`LoadedModel.generate`), which the adapter changes. `serve --adapter=a=DIR
  --adapter=b=DIR` (server.build(adapters=)): each request gets the text of the adapter its
  `model` field names, the checkpoint's name the base's; /v1/models lists all three, and an
  unknown name is a 404 that lists them."""
  pytest.importorskip("fastapi")
  from fastapi.testclient import TestClient

  import jaxllm
  from jaxllm.inference import server as server_lib
  base = jaxllm.load(tiny_chat_model)
  prompt, want = "The capital of", {"m": base.generate("The capital of", max_tokens=8)}
  for name, seed in (("a", 2), ("b", 7)):
    lora = lora_with_updates(base.params, adapters.LoraConfig(
        rank=4, targets=("q", "v", "down")), seed=seed, scale=1.0)
    peft_format.save(str(tmp_path / name), lora, base.config)
    want[name] = jaxllm.load(tiny_chat_model, adapter=tmp_path / name).generate(
        prompt, max_tokens=8)
  assert len(set(want.values())) == 3  # each adapter shows in the text

  def complete(client, model):
    reply = client.post("/v1/completions", json={
        "model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0})
    assert reply.status_code == 200, reply.text
    assert reply.json()["model"] == model
    return reply.json()["choices"][0]["text"]

  app, engine = server_lib.build(tiny_chat_model, adapter=str(tmp_path / "a"), max_slots=2,
                                 num_pages=16, max_seq_len=128, model_name="m")
  try:
    assert complete(TestClient(app), "m") == want["a"]
  finally:
    engine.shutdown()
  app, engine = server_lib.build(tiny_chat_model, adapters={"a": str(tmp_path / "a"),
                                                            "b": str(tmp_path / "b")},
                                 max_slots=4, num_pages=32, max_seq_len=128, model_name="m")
  try:
    client = TestClient(app)
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["m", "a", "b"]
    for model in ("b", "m", "a"):
      assert complete(client, model) == want[model], model
    reply = client.post("/v1/completions", json={"model": "c", "prompt": prompt})
    assert reply.status_code == 404 and "'m', 'a', 'b'" in reply.json()["error"]["message"]
  finally:
    engine.shutdown()


def test_requests_of_different_adapters_in_one_batch_each_equal_their_merged_model(
    monkeypatch):
  """Multi-LoRA in the engine (`jaxllm.lora.bank`): the base and two adapters (ranks 2 and 4,
  different targets) decoded in shared batches; each request's tokens equal greedy decoding by
  full forward passes of its own merged model. A prompt whose pages another adapter cached is
  computed again (prefix-cache keys are per adapter), and an unknown slot is refused; with a
  layer-skip draft of the banked model, speculative decoding gives the same tokens."""
  from jaxllm.inference import engine as engine_lib
  from jaxllm.inference import steps as steps_lib
  from tests.helpers import greedy_by_recompute
  graphdef, params = _model()
  one = lora_with_updates(params, adapters.LoraConfig(rank=2, targets=("q", "v")), seed=3,
                          scale=1.0)
  two = lora_with_updates(params, adapters.LoraConfig(rank=4, targets=("v", "o", "up")),
                          seed=5, scale=1.0)
  served = bank.build(params, [one, two])
  assert bank.size(served) == 3
  engine = engine_lib.Engine(graphdef, served, engine_lib.EngineConfig(
      max_slots=4, num_pages=32, page_size=4, prefill_chunk=8))
  prompt = [3, 17, 40, 5, 9, 22, 31, 2, 11]  # two full pages of 4: cacheable
  slots = [0, 1, 2, 1, 2]
  reqs = [engine.submit(prompt if i < 3 else prompt[:6] + [7], sampling.SamplingParams(
      max_tokens=6), adapter=slot) for i, slot in enumerate(slots)]
  steps = []  # the adapters of each decode step's active rows, as the device step gets them
  decode = steps_lib.decode
  monkeypatch.setattr(steps_lib, "decode", lambda graphdef, params, state, batch, **kw: (
      steps.append(np.asarray(batch.adapters_B)[np.asarray(batch.active_B)].tolist())
      or decode(graphdef, params, state, batch, **kw)))
  engine.run_until_idle()
  models = {0: params, 1: adapters.merge(one), 2: adapters.merge(two)}
  want = {(tuple(r.prompt), s): greedy_by_recompute(graphdef, models[s], r.prompt, 6)
          for r, s in zip(reqs, slots)}
  assert len({tuple(w) for w in want.values()}) >= 3  # the adapters change the tokens
  for r, s in zip(reqs, slots):
    assert r.tokens == want[tuple(r.prompt), s], (s, r.prompt)
  assert max(len(set(step)) for step in steps) == 3  # a decode step served all three
  # The first page of requests 3 and 4 is their adapter's earlier request's; the prompt the
  # first three share is computed under each adapter (salted keys).
  assert engine.stats["prefix_hit_tokens"] == 2 * 4
  with pytest.raises(ValueError, match="holds slots 0 to 2"):
    engine.submit(prompt, sampling.SamplingParams(max_tokens=2), adapter=3)
  # Speculative decoding with a layer-skip draft of the banked model: each row's draft
  # proposes with its adapter, and the tokens stay each merged model's (with requests of
  # different adapters prefilling in one call, target and draft alike: prefill_rows 3).
  from jaxllm.inference import speculative
  spec = engine_lib.Engine(graphdef, served, engine_lib.EngineConfig(
      max_slots=4, num_pages=32, page_size=4, prefill_chunk=8, speculative_k=2,
      prefill_rows=3),
      draft=speculative.layer_skip_draft(graphdef, served, 1))
  again = [spec.submit(r.prompt, sampling.SamplingParams(max_tokens=6), adapter=s)
           for r, s in zip(reqs, slots)]
  spec.run_until_idle()
  assert [r.tokens for r in again] == [r.tokens for r in reqs]
  assert spec.stats["speculative_accepted"] > 0


def test_serves_adapter_flag_takes_one_dir_or_named_dirs():
  pytest.importorskip("fastapi")
  from jaxllm.inference import server
  assert server.adapter_arguments([]) == {}
  assert server.adapter_arguments(["d"]) == {"adapter": "d"}
  assert server.adapter_arguments(["a=x", "b=y/z"]) == {"adapters": {"a": "x", "b": "y/z"}}
  for bad, reason in ((["d", "e"], "give one DIR"), (["d", "a=x"], "give one DIR"),
                      (["a=x", "a=y"], "names repeat")):
    with pytest.raises(ValueError, match=reason):
      server.adapter_arguments(bad)
