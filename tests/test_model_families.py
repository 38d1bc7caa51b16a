"""Model families beside Llama and Mistral: Qwen2, Qwen3, Phi-3, OLMo 2, Gemma 2 and Gemma 3, in
and out.

Each family is a randomly initialised small `transformers` model (no weights of these families
ship offline), saved as safetensors, imported, run, exported and loaded back; the reference is
`transformers` itself (torch, CPU, float32). Every weight, norms and biases included, is drawn
at random so that a mapping error anywhere moves the logits.
"""

import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import jaxllm  # noqa: E402
from jaxllm.checkpoint import convert, hf_format  # noqa: E402
from jaxllm.checkpoint.errors import UnsupportedCheckpoint  # noqa: E402
from jaxllm.inference import generate as generate_lib  # noqa: E402
from jaxllm.inference import sampling  # noqa: E402
from jaxllm.model import transformer  # noqa: E402

V = 96
COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10_000.0,
              # 5x transformers' default spread: attention far from uniform, decisive argmaxes.
              initializer_range=0.1, pad_token_id=None, bos_token_id=None, eos_token_id=None)

# family -> (transformers config, what the import must have set, export model_type)
FAMILIES = {
    "qwen2": (lambda: transformers.Qwen2Config(**COMMON), dict(qkv_bias=True), None),
    "qwen3": (lambda: transformers.Qwen3Config(**COMMON, head_dim=24),
              dict(qk_norm=True, head_dim=24), None),
    "phi3": (lambda: transformers.Phi3Config(**COMMON, sliding_window=7), dict(sliding_window=7),
             "phi3"),
    "olmo2": (lambda: transformers.Olmo2Config(**COMMON),
              dict(qk_norm=True, qk_norm_over_heads=True, norm_placement="post"), None),
    # Local layer 0, global layer 1; caps small enough to bite; 1/sqrt(24) softmax scale.
    "gemma2": (lambda: transformers.Gemma2Config(
        **COMMON, head_dim=16, query_pre_attn_scalar=24, sliding_window=5,
        attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
               dict(norm_placement="sandwich", norm_offset=1.0, global_every=2,
                    attn_logit_soft_cap=2.0, final_logit_soft_cap=3.0), None),
    # Layers 0, 1 local (RoPE base 10k), layer 2 global (base 1e6, linear scaling x2).
    "gemma3_text": (lambda: transformers.Gemma3TextConfig(
        **dict(COMMON, num_hidden_layers=3, rope_theta=1e6), head_dim=16, sliding_window=5,
        sliding_window_pattern=3, query_pre_attn_scalar=24, rope_local_base_freq=10_000.0,
        rope_scaling={"rope_type": "linear", "factor": 2.0}),
                    dict(qk_norm=True, global_every=3, rope_local_theta=10_000.0,
                         rope_scaling="linear", rope_theta=1e6), None),
}


# A word-level tokenizer over the random models' vocabulary, with a chat template: what a real
# checkpoint directory carries beside its weights.
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")
WORDS = ["<bos>", "<eos>", "<user>", "<assistant>"] + [f"w{i}" for i in range(V - 4)]


def _save_tokenizer(path):
  from tokenizers import Tokenizer, models, pre_tokenizers
  raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="w0"))
  raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<bos>",
                                             eos_token="<eos>")
  tok.chat_template = CHAT_TEMPLATE
  tok.save_pretrained(path)


GEMMA_LAYERS = dict(norm_placement="sandwich", norm_offset=1.0, embed_scale=True,
                    mlp_activation="gelu_tanh", query_pre_attn_scalar=48, global_every=2,
                    sliding_window=6, rope_local_theta=1000.0)


def _hf_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.numpy()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
  """(name, transformers model, our config, our params, its source directory), read through
  `jaxllm.load` as a user would."""
  name = request.param
  make_config, _, _ = FAMILIES[name]
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(make_config(), dtype=torch.float32)
  with torch.no_grad():  # norms start at ones and biases at zero: randomise them too
    for key, p in model.named_parameters():
      if key.endswith("bias") or "norm" in key:
        p.add_(0.3 * torch.randn_like(p))
  model.eval()
  src = tmp_path_factory.mktemp(name) / "src"
  model.save_pretrained(src)
  _save_tokenizer(src)
  loaded = jaxllm.load(src)
  return name, model, loaded.config, loaded.params, src


def test_import_gives_the_logits_of_transformers(family):
  name, model, cfg, params, _ = family
  for key, value in FAMILIES[name][1].items():
    assert getattr(cfg, key) == value, key
  graphdef, _ = transformer.abstract_params(cfg)
  ids = np.random.default_rng(0).integers(0, V, size=(2, 20))
  got = np.asarray(jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, ids))
  np.testing.assert_allclose(got, _hf_logits(model, ids.tolist()), atol=1e-4)


def test_export_loads_back_into_transformers(family, tmp_path):
  name, model, cfg, params, src = family
  want_type = FAMILIES[name][2]
  assert hf_format.model_type_for(cfg, want_type) == name
  convert.export_hf(convert.read_checkpoint(src), str(tmp_path / "out"), want_type)
  written = json.loads((tmp_path / "out" / "config.json").read_text())
  assert written["model_type"] == name
  if name == "phi3":  # the fused layout, as Phi-3 checkpoints hold it
    names = set(hf_format.read_state_dict(str(tmp_path / "out")))
    assert "model.layers.0.self_attn.qkv_proj.weight" in names
    assert "model.layers.0.mlp.gate_up_proj.weight" in names
  again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out",
                                                            dtype=torch.float32).eval()
  ids = np.random.default_rng(1).integers(0, V, size=(1, 24)).tolist()
  np.testing.assert_allclose(_hf_logits(again, ids), _hf_logits(model, ids), atol=1e-5)
  # The tokenizer and its chat template travel with the weights. (Not AutoTokenizer: for
  # Qwen2 it picks Qwen2Tokenizer by model_type, which rebuilds a BPE model around this
  # word-level one.)
  tok = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path / "out")
  chat = [{"role": "user", "content": "w5 w6"}]
  text = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
  ours = jaxllm.load(tmp_path / "out").chat_ids(chat)
  assert ours == tok.encode(text, add_special_tokens=False) == [2, 9, 10, 3]


@pytest.mark.parametrize("cache", ["contiguous", "paged"])
def test_greedy_decoding_equals_transformers_generate(family, cache):
  """32 greedy tokens through our KV cache (contiguous or paged) are those of
  `transformers.generate`, and each is the argmax of our full forward over what precedes it."""
  _, model, cfg, params, _ = family
  rng = np.random.default_rng(2)
  prompts = [rng.integers(0, V, size=n).tolist() for n in (5, 11)]
  sp = sampling.SamplingParams(temperature=0.0, max_tokens=32)
  graphdef, _ = transformer.abstract_params(cfg)
  ours = generate_lib.generate_requests(graphdef, params, prompts, [sp] * len(prompts),
                                        max_seq_len=cfg.max_seq_len, cache=cache, page_size=8)
  for prompt, result in zip(prompts, ours):
    with torch.no_grad():
      out = model.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32,
                           do_sample=False)
    assert result.tokens == out[0, len(prompt):].tolist()
    full = prompt + result.tokens
    logits = np.asarray(nnx.merge(graphdef, params)(jnp.asarray([full[:-1]])))[0]
    assert logits[len(prompt) - 1:].argmax(-1).tolist() == result.tokens


def test_variants_jaxllm_lacks_are_refused_with_a_reason():
  hf = transformers.Phi3Config(**COMMON, partial_rotary_factor=0.5).to_dict()
  with pytest.raises(UnsupportedCheckpoint, match="partial_rotary_factor=0.5"):
    hf_format.model_config(hf)
  hf = dict(transformers.Qwen2Config(**COMMON).to_dict(), use_sliding_window=True,
            sliding_window=8, max_window_layers=1, layer_types=None)
  with pytest.raises(UnsupportedCheckpoint, match="sliding windows on some layers only"):
    hf_format.model_config(hf)
  llama = hf_format.model_config(transformers.LlamaConfig(**COMMON).to_dict())
  with pytest.raises(UnsupportedCheckpoint, match="it is a llama model, not"):
    hf_format.model_type_for(llama, "qwen2")
  # Gemma's pieces on a model no family holds: refused before anything is written.
  with pytest.raises(UnsupportedCheckpoint, match="local and global layers"):
    hf_format.model_type_for(dataclasses.replace(llama, global_every=2, sliding_window=4))
  with pytest.raises(UnsupportedCheckpoint, match="Gemma has sandwich norms"):
    hf_format.model_type_for(dataclasses.replace(llama, norm_placement="sandwich"))
  # Streaming generation does not take Gemma's local/global layers yet: refused up front.
  from tests.helpers import tiny_model
  gemma = tiny_model(**GEMMA_LAYERS)
  graphdef, params = transformer.split(transformer.create(gemma))
  sp = sampling.SamplingParams(max_tokens=2)
  with pytest.raises(ValueError, match="does not support models with local and global"):
    generate_lib.generate_requests(graphdef, params, [[1, 2]], [sp],
                                   stream=generate_lib.stream_of(2, 8))
  hf = transformers.Gemma2Config(**COMMON, layer_types=[
      "full_attention", "sliding_attention"]).to_dict()
  with pytest.raises(UnsupportedCheckpoint, match="are not a pattern jaxllm runs"):
    hf_format.model_config(hf)


@pytest.mark.parametrize("arch, variant", [
    ("qwen2", dict(qkv_bias=True)), ("qwen3", dict(qk_norm=True, head_dim=16)),
    ("phi3", dict(sliding_window=5)),
    ("olmo2", dict(qk_norm=True, qk_norm_over_heads=True, norm_placement="post")),
    # llama.cpp's fixed layouts: every 2nd (Gemma 2) or 6th (Gemma 3) layer global, Gemma 3's
    # local RoPE base 10k; the softmax scale of a non-27B model is 1/sqrt(head_dim).
    ("gemma2", dict(GEMMA_LAYERS, query_pre_attn_scalar=8, rope_local_theta=0.0,
                    attn_logit_soft_cap=2.0, final_logit_soft_cap=5.0)),
    ("gemma3", dict(GEMMA_LAYERS, query_pre_attn_scalar=8, qk_norm=True, global_every=6,
                    n_layers=6, rope_theta=1e6, rope_local_theta=1e4))])
def test_gguf_import_of_the_dense_family_architectures(arch, variant, tmp_path):
  """llama.cpp's `qwen2`, `qwen3`, `phi3`, `olmo2`, `gemma2` and `gemma3` files (rotate-half
  q/k rows; biases, q/k norms, fused projections, post-norms and Gemma's 1 + w norms named and
  stored as llama.cpp does) load as the model they were written from."""
  from jaxllm.checkpoint import gguf_format
  from tests import gguf_fixtures
  from tests.helpers import tiny_model
  cfg = tiny_model(vocab_size=40, tie_embeddings=False, **variant)
  if arch == "phi3":  # no q/k/v names: only the fused tensors can have been read
    assert "attn_q" not in gguf_format.layer_names(arch)
  graphdef, params = transformer.split(transformer.create(cfg, seed=4))
  rng = np.random.default_rng(4)  # biases and norm scales off their zeros and ones
  params = jax.tree_util.tree_map_with_path(
      lambda path, a: a + 0.3 * rng.standard_normal(a.shape).astype(a.dtype)
      if any(k in jax.tree_util.keystr(path) for k in ("bias", "norm")) else a, params)
  gguf_fixtures.write_llama_gguf(tmp_path / "m.gguf", cfg, jax.device_get(params), arch=arch)
  loaded = jaxllm.load(tmp_path / "m.gguf")
  for key, value in variant.items():
    assert getattr(loaded.config, key) == value, key
  ids = np.random.default_rng(5).integers(0, 40, size=(1, 12))
  want = nnx.merge(graphdef, params)(jnp.asarray(ids))
  np.testing.assert_allclose(np.asarray(loaded.logits(ids)), np.asarray(want), atol=1e-5)


@pytest.mark.parametrize("variant", [dict(attn_logit_soft_cap=2.0, final_logit_soft_cap=5.0),
                                     dict(qk_norm=True)], ids=["gemma2", "gemma3"])
def test_gemma_layers_through_the_kernels_equal_xla(variant):
  """Our flash kernel (the forward) and paged kernel (decoding; soft-capped models fall back to
  XLA there) run Gemma's local and global layers, each layer's window chosen by `lax.cond`
  from its depth, as the XLA path does (kernels interpreted on CPU)."""
  from tests.helpers import tiny_model
  cfg = tiny_model(d_model=64, n_heads=2, n_kv_heads=1, head_dim=64, d_ff=64, **GEMMA_LAYERS,
                   **variant)
  graphdef, params = transformer.split(transformer.create(cfg, seed=6))
  rng = np.random.default_rng(6)
  params = jax.tree.map(lambda a: a + 0.2 * rng.standard_normal(a.shape).astype(a.dtype)
                        if a.ndim <= 2 else a, params)  # norms off zero
  kernel_graphdef, _ = transformer.abstract_params(
      dataclasses.replace(cfg, attention_impl="pallas"))
  ids = jnp.asarray(rng.integers(0, cfg.vocab_size, size=(2, 20)))
  want = nnx.merge(graphdef, params)(ids)
  np.testing.assert_allclose(np.asarray(nnx.merge(kernel_graphdef, params)(ids)),
                             np.asarray(want), atol=2e-5)
  # A 20-token prefill then 4 decode steps through paged caches: each step's logits equal.
  from jaxllm.model import cache as kv_cache

  def decode(gd):
    model = nnx.merge(gd, params)
    cache = kv_cache.init_paged_cache(cfg.n_layers, 4, 16, 1, 64, [[3, 0], [1, 2]])
    out, cache = model.extend(ids, cache)
    steps = [out]
    for t in range(4):
      out, cache = model.extend(ids[:, t:t + 1], cache)
      steps.append(out)
    return np.concatenate([np.asarray(s) for s in steps], axis=1)

  np.testing.assert_allclose(decode(kernel_graphdef), decode(graphdef), atol=2e-5)
