"""Inference on a mesh (8 simulated CPU devices) equals inference on one device.

Every check compares a tensor-parallel (and data x tensor) run with the single-device run of the
same params: greedy tokens equal token for token, logits within 1e-5 relative, and each device
holds 1/TP of the weights and of the KV cache (KV heads replicated up to the tensor size where
it does not divide them).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxllm
from jaxllm.config import ConfigError
from jaxllm.inference import engine as engine_lib
from jaxllm.inference import generate as gen
from jaxllm.inference import sampling, speculative
from jaxllm.model import transformer
from jaxllm.parallel import placement
from jaxllm.quant import params as qparams
from tests.helpers import tiny_model

PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40]]
GREEDY = [sampling.SamplingParams(max_tokens=10)] * len(PROMPTS)


def _model(**overrides):
  # 8 query heads, 2 KV heads: tensor=4 and 8 replicate KV heads, tensor=2 splits them.
  cfg = tiny_model(**{**dict(n_heads=8, n_kv_heads=2, head_dim=16, d_model=64, d_ff=128,
                             dtype="float32", init_std=0.2), **overrides})
  graphdef, params = transformer.split(transformer.create(cfg, 0))
  return cfg, graphdef, params


def _place(cfg, params, **mesh):
  m = placement.serving_mesh(**mesh)
  placed, cfg2 = placement.place_params(params, cfg, m, transformer.logical_axes(cfg))
  return transformer.abstract_params(cfg2)[0], placed, cfg2


def _tokens(results):
  return [r.tokens if hasattr(r, "tokens") else r for r in results]


@pytest.fixture(scope="module")
def model():
  cfg, graphdef, params = _model()
  want = gen.generate_requests(graphdef, params, PROMPTS, GREEDY, cache="paged")
  return cfg, graphdef, params, _tokens(want)


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_tensor_parallel_generation_logits_and_bytes(model, tp):
  cfg, graphdef, params, want = model
  g2, p2, cfg2 = _place(cfg, params, tensor=tp)
  assert cfg2.n_kv_heads == max(cfg.n_kv_heads, tp)
  for cache in ("contiguous", "paged"):
    got = gen.generate_requests(g2, p2, PROMPTS, GREEDY, cache=cache)
    assert _tokens(got) == want, (tp, cache)
  ids = jnp.asarray([PROMPTS[0]], jnp.int32)
  ref = jax.jit(lambda p: transformer.nnx.merge(graphdef, p)(ids))(params)
  with placement.in_mesh(placement.mesh_of(p2)):
    out = jax.jit(lambda p: transformer.nnx.merge(g2, p)(ids))(p2)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  # Weights: every device holds the same bytes, 1/TP of the (replicated-KV) model's matrices;
  # what stays whole on each is the norms alone.
  per_device = placement.bytes_per_device(p2)
  assert len(per_device) == tp and len(set(per_device.values())) == 1
  norms = sum(x.nbytes for path, x in qparams.flatten(p2).items() if "norm" in path)
  assert next(iter(per_device.values())) == (placement.total_bytes(p2) - norms) // tp + norms
  # The cache: pages split over KV heads.
  kv = gen.new_cache(cfg2, "paged", [16] * 2, max_len=32, mesh=placement.mesh_of(p2))
  assert set(placement.bytes_per_device(kv.k).values()) == {placement.total_bytes(kv.k) // tp}


def test_data_by_tensor_mesh_engine_and_speculative_decoding(model):
  cfg, graphdef, params, want = model
  g2, p2, _ = _place(cfg, params, data=2, tensor=4)
  assert _tokens(gen.generate_requests(g2, p2, PROMPTS, GREEDY, cache="contiguous")) == want
  engine = engine_lib.Engine(g2, p2, engine_lib.EngineConfig(max_slots=4, num_pages=64,
                                                             page_size=16, prefill_chunk=8))
  assert tuple(engine.state.k.sharding.spec)[:4] == (None, None, None, "tensor")
  assert _tokens(engine_lib.generate_all(engine, PROMPTS, GREEDY)) == want
  assert tuple(engine.state.k.sharding.spec)[:4] == (None, None, None, "tensor")
  draft = speculative.layer_skip_draft(g2, p2, 1)
  got, _ = speculative.speculative_generate(g2, p2, PROMPTS, GREEDY, draft, k=3)
  assert _tokens(got) == want
  spec_engine = engine_lib.Engine(g2, p2, engine_lib.EngineConfig(
      max_slots=4, num_pages=64, page_size=16, prefill_chunk=8, speculative_k=3), draft=draft)
  assert _tokens(engine_lib.generate_all(spec_engine, PROMPTS, GREEDY)) == want


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_weights_and_int8_pages_on_a_mesh(model, bits):
  cfg, graphdef, params, _ = model
  qp, _ = qparams.quantize_params(params, qparams.QuantSpec(bits=bits, group_size=16))
  want = _tokens(gen.generate_requests(graphdef, qp, PROMPTS, GREEDY, cache="paged",
                                       cache_dtype=jnp.int8))
  g2, p2, _ = _place(cfg, qp, tensor=4)
  q = p2["blocks"]["attn"]["q"]
  assert q.values.sharding.spec[-1] == "tensor"  # columns (query heads) split
  engine = engine_lib.Engine(g2, p2, engine_lib.EngineConfig(
      max_slots=4, num_pages=64, page_size=16, prefill_chunk=8, cache_dtype="int8"))
  assert _tokens(engine_lib.generate_all(engine, PROMPTS, GREEDY)) == want
  kv_bytes = placement.bytes_per_device(engine.state.k)
  assert set(kv_bytes.values()) == {placement.total_bytes(engine.state.k) // 4}


def test_pallas_paged_kernel_runs_per_shard():
  # Our paged kernel (interpreted on CPU) inside shard_map, one KV head per device.
  cfg, graphdef, params = _model(attention_impl="pallas")
  want = _tokens(gen.generate_requests(graphdef, params, PROMPTS[:2], GREEDY[:2], cache="paged"))
  g2, p2, _ = _place(cfg, params, tensor=2)
  with placement.in_mesh(placement.mesh_of(p2)):
    kv = gen.new_cache(transformer.nnx.merge(g2, p2).cfg, "paged", [32, 32], max_len=32,
                       mesh=placement.mesh_of(p2))
    text = jax.jit(lambda p, c: gen.decode_step.__wrapped__(
        g2, p, jnp.zeros((2,), jnp.int32), c)).lower(p2, kv).as_text()
  assert "shard_map" in text or "sdy.manual_computation" in text
  assert _tokens(gen.generate_requests(g2, p2, PROMPTS[:2], GREEDY[:2], cache="paged")) == want


def test_bad_meshes_fail_in_one_line():
  cfg, _, params = _model(n_heads=6, n_kv_heads=3)
  with pytest.raises(ConfigError, match="6 query heads, which tensor=4 does not divide"):
    placement.place_params(params, cfg, placement.serving_mesh(tensor=4),
                           transformer.logical_axes(cfg))
  with pytest.raises(ConfigError, match="needs 16 devices, 8 are available"):
    placement.parse_mesh("tensor=16")
  with pytest.raises(ConfigError, match="AXIS=N"):
    placement.parse_mesh("stage=2")
  with pytest.raises(ConfigError, match="not an integer"):
    placement.parse_mesh("tensor=two")


@pytest.mark.parametrize("bits", [None, 4])
def test_orbax_checkpoint_restores_into_its_shards(tmp_path, model, bits):
  from jaxllm.checkpoint import convert
  from jaxllm.data import tokenizer as tokenizer_lib
  cfg, graphdef, params, want = model
  tok = tokenizer_lib.HFTokenizer(tokenizer_lib.tokenizer_from_gguf_vocab(
      ["<s>", "</s>", "a", "b"], [], [3, 3, 1, 1], "gpt2"), bos_id=0, eos_id=1)
  spec = None
  if bits:
    params, spec = qparams.quantize_params(params, qparams.QuantSpec(bits=bits, group_size=16))
    want = _tokens(gen.generate_requests(graphdef, params, PROMPTS, GREEDY, cache="paged"))
  convert.export_orbax(convert.Checkpoint(cfg, params, tok, "jaxllm"), str(tmp_path / "m"))
  if spec is not None:
    spec.save(str(tmp_path / "m"))
  loaded = jaxllm.load(str(tmp_path / "m"), mesh="tensor=2")
  q = loaded.params["blocks"]["attn"]["q"]
  spec_of = (q.values if bits else q).sharding.spec
  assert spec_of[-1 if bits else -2] == "tensor"
  assert loaded.mesh is not None and loaded.config.n_kv_heads == 2
  got = gen.generate_requests(loaded.graphdef, loaded.params, PROMPTS, GREEDY, cache="paged")
  assert _tokens(got) == want


@pytest.fixture(scope="module")
def chat_model(tiny_chat_model):
  """The tiny chat model (a Hugging Face directory with SmolLM2's tokenizer) on one device:
  (path, prompts, greedy tokens, logits of the second prompt)."""
  one = jaxllm.load(tiny_chat_model)
  prompts = [one.chat_ids([{"role": "user", "content": "What is a Python list?"}]),
             one.prompt_ids("def fibonacci(n):")]
  want = gen.generate_requests(one.graphdef, one.params, prompts, CHAT_GREEDY, cache="paged")
  return tiny_chat_model, prompts, _tokens(want), np.asarray(one.logits([prompts[1]]))


CHAT_GREEDY = [sampling.SamplingParams(max_tokens=12)] * 2


@pytest.mark.parametrize("mesh", ["tensor=3", "data=2,tensor=3"])
def test_hf_checkpoint_on_a_mesh_equals_one_device(chat_model, mesh):
  # 6 query heads and 3 KV heads (SmolLM2 has 9 and 3): one KV head per device.
  path, prompts, want, ref = chat_model
  split = jaxllm.load(path, mesh=mesh)
  assert split.config.n_kv_heads == 3
  got = gen.generate_requests(split.graphdef, split.params, prompts, CHAT_GREEDY, cache="paged")
  assert _tokens(got) == want
  out = np.asarray(split.logits([prompts[1]]))
  rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
  assert rel <= 1e-5, rel
  per_device = set(placement.bytes_per_device(split.params).values())
  assert max(per_device) <= placement.total_bytes(split.params) / 3 * 1.01
