"""MoE checkpoints in and out: Hugging Face Mixtral, Qwen2-MoE and Qwen3-MoE (randomly
initialised small models built with `transformers`; no MoE weights ship offline), GGUF's
stacked expert tensors, and orbax.
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
from flax import nnx  # noqa: E402

import jaxllm  # noqa: E402
from jaxllm.checkpoint import convert, hf_format, layouts  # noqa: E402
from jaxllm.checkpoint.errors import UnsupportedCheckpoint  # noqa: E402
from jaxllm.model import transformer  # noqa: E402
from tests import gguf_fixtures  # noqa: E402
from tests.helpers import tiny_model  # noqa: E402

COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
              tie_word_embeddings=False, num_experts_per_tok=2)


def _hf_model(kind):
  if kind == "mixtral":
    config = transformers.MixtralConfig(**COMMON, intermediate_size=24, num_local_experts=4)
  elif kind == "qwen2_moe":  # layers 1 and 3 MoE (sparse step 2), a gated shared expert
    config = transformers.Qwen2MoeConfig(**COMMON, intermediate_size=40, moe_intermediate_size=16,
                                         shared_expert_intermediate_size=32, num_experts=4,
                                         decoder_sparse_step=2, norm_topk_prob=False)
  else:  # layer 0 dense (mlp_only_layers), q/k norms
    config = transformers.Qwen3MoeConfig(**COMMON, intermediate_size=40, moe_intermediate_size=16,
                                         num_experts=4, head_dim=8, mlp_only_layers=[0],
                                         norm_topk_prob=True)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  with torch.no_grad():  # decisive routing: randomly initialised routers are nearly uniform
    for name, p in model.named_parameters():
      if name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):
        p.normal_(0.0, 1.0)
  return model.eval()


def _logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_hf_moe_import_matches_transformers_and_exports_back(kind, tmp_path):
  model = _hf_model(kind)
  model.save_pretrained(tmp_path / "src")
  cfg = hf_format.model_config(json.loads((tmp_path / "src" / "config.json").read_text()))
  assert cfg.n_experts == 4 and cfg.experts_per_token == 2
  params = layouts.params_from_hf(hf_format.read_state_dict(str(tmp_path / "src")), cfg)
  layout = transformer.layer_layout(cfg)
  want_moe = {"mixtral": [0, 1, 2, 3], "qwen2_moe": [1, 3], "qwen3_moe": [1, 2, 3]}[kind]
  assert list(layout.moe_depths()) == want_moe
  graphdef, _ = transformer.abstract_params(cfg)
  ids = np.random.default_rng(0).integers(0, 96, size=(2, 24))
  forward = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))
  got = np.asarray(forward(jax.tree.map(jax.numpy.asarray, params), ids))
  want = _logits(model, ids.tolist())
  np.testing.assert_allclose(got, want, atol=1e-4)
  # And out again: the config picks the family back, and transformers loads it, same logits.
  assert hf_format.model_type_for(cfg) == kind
  state = layouts.hf_from_params(params, cfg, "mixtral" if kind == "mixtral" else "qwen")
  hf_format.write(str(tmp_path / "out"), cfg, state, bos_id=None, eos_id=None)
  again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
  np.testing.assert_allclose(_logits(again.eval(), ids.tolist()), want, atol=1e-5)


def test_moe_models_without_a_hugging_face_family_are_refused_before_writing(tmp_path):
  cfg = tiny_model(n_experts=4, router="sigmoid")
  _, params = transformer.split(transformer.create(cfg))
  with pytest.raises(UnsupportedCheckpoint, match="no Hugging Face architecture"):
    convert.export_hf(convert.Checkpoint(cfg, params, None, "jaxllm"), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


def test_gguf_stacked_experts_import(tmp_path):
  cfg = tiny_model(vocab_size=64, n_layers=2, n_experts=4, experts_per_token=2, moe_d_ff=16,
                   norm_topk_prob=True, tie_embeddings=False)
  graphdef, params = transformer.split(transformer.create(cfg, seed=1))
  params = jax.device_get(params)
  gguf_fixtures.write_mixtral_gguf(tmp_path / "m.gguf", cfg, params)
  loaded = jaxllm.load(tmp_path / "m.gguf")
  assert (loaded.config.n_experts, loaded.config.experts_per_token) == (4, 2)
  ids = np.random.default_rng(1).integers(0, 64, size=(1, 12))
  want = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, ids)
  np.testing.assert_allclose(np.asarray(loaded.logits(ids)), np.asarray(want), atol=1e-5)
  # ... and through orbax, restored onto the same model.
  convert.export_orbax(convert.read_checkpoint(tmp_path / "m.gguf"), str(tmp_path / "orbax"))
  again = jaxllm.load(tmp_path / "orbax")
  np.testing.assert_allclose(np.asarray(again.logits(ids)), np.asarray(want), atol=1e-6)
