"""Checkpoint interchange without torch: layouts, GGUF and HF readers/writers, orbax export,
tokenizers from GGUF, chat templates, the eval window, and clear errors for bad files."""

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
from jaxllm.checkpoint import convert, layouts
from jaxllm.checkpoint.errors import UnsupportedCheckpoint
from jaxllm.data import chat, tokenizer as tokenizer_lib
from jaxllm.eval.scoring import windows
from jaxllm.model import transformer
from tests.gguf_fixtures import write_llama_gguf
from tests.helpers import REPO, tiny_model, xla_flags


def _random(cfg, seed=0):
  graphdef, params = transformer.split(transformer.create(cfg, seed))
  # Norm scales start at 1: perturb them so a swapped norm would show.
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(len(str(p))), x.shape)
      if "scale" in str(p) else x, params)
  return graphdef, jax.tree.map(np.asarray, params)


def test_rope_row_permutation_round_trips():
  w = np.arange(3 * 8 * 5, dtype=np.float32).reshape(24, 5)
  inter = layouts.half_to_interleaved(w, 3)
  np.testing.assert_array_equal(layouts.interleaved_to_half(inter, 3), w)
  # Head 0 rotate-half rows (0, 4) form pair 0, stored adjacent in GGML's order.
  np.testing.assert_array_equal(inter[:2], w[[0, 4]])


@pytest.mark.parametrize("tie", [True, False])
def test_hf_layout_round_trip(tie):
  cfg = tiny_model(tie_embeddings=tie)
  _, params = _random(cfg)
  back = layouts.params_from_hf(layouts.hf_from_params(params, cfg), cfg)
  chex.assert_trees_all_equal(back, params)


def test_gguf_f32_loads_exactly_and_q8_0_closely(tmp_path):
  cfg = tiny_model(vocab_size=40, n_heads=4, n_kv_heads=2)
  graphdef, params = _random(cfg, 1)
  tokens = jnp.asarray([[1, 5, 9, 3, 20, 7]])
  want = nnx.merge(graphdef, params)(tokens)
  for qtype, atol in (("F32", 1e-5), ("Q8_0", 5e-2)):
    path = tmp_path / f"m-{qtype}.gguf"
    write_llama_gguf(path, cfg, params, qtype=qtype)
    model = jaxllm.load(path)
    assert model.config.n_kv_heads == 2 and model.config.tie_embeddings
    np.testing.assert_allclose(model.logits(tokens), want, atol=atol)
  assert model.tokenizer.bos_id == 1 and model.tokenizer.eos_id == 2


def test_hf_and_orbax_exports_round_trip(tmp_path):
  cfg = tiny_model(vocab_size=40, tie_embeddings=False, sliding_window=3)
  _, params = _random(cfg, 2)
  src = tmp_path / "src.gguf"
  write_llama_gguf(src, tiny_model(vocab_size=40, tie_embeddings=True), _random(
      tiny_model(vocab_size=40, tie_embeddings=True), 3)[1])
  tok = jaxllm.load(src).tokenizer
  ckpt = convert.Checkpoint(cfg, params, tok, "test")
  convert.export_hf(ckpt, str(tmp_path / "hf"))
  hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert hf_config["model_type"] == "mistral" and hf_config["sliding_window"] == 3
  back = convert.read_checkpoint(tmp_path / "hf")
  assert back.model == cfg
  chex.assert_trees_all_equal(back.params, params)
  assert back.tokenizer.encode("abc t5") == tok.encode("abc t5")

  convert.export_orbax(back, str(tmp_path / "orbax"))
  again = jaxllm.load(tmp_path / "orbax")
  chex.assert_trees_all_equal(jax.device_get(again.params), params)
  assert again.config == cfg


def test_alibi_models_export_to_orbax_and_refuse_hf(tmp_path):
  cfg = tiny_model(vocab_size=40, position_encoding="alibi", n_heads=6, n_kv_heads=3)
  _, params = _random(cfg, 2)
  src = tmp_path / "src.gguf"
  write_llama_gguf(src, tiny_model(vocab_size=40), _random(tiny_model(vocab_size=40), 3)[1])
  ckpt = convert.Checkpoint(cfg, params, jaxllm.load(src).tokenizer, "test")
  with pytest.raises(UnsupportedCheckpoint, match="position_encoding=alibi"):
    convert.export_hf(ckpt, str(tmp_path / "hf"))
  assert not (tmp_path / "hf").exists()
  convert.export_orbax(ckpt, str(tmp_path / "orbax"))
  again = jaxllm.load(tmp_path / "orbax")
  assert again.config == cfg
  tokens = [[3, 9, 4, 1, 30, 2, 7]]
  want = nnx.merge(transformer.abstract_params(cfg)[0], jax.tree.map(jnp.asarray, params))(
      jnp.asarray(tokens))
  np.testing.assert_allclose(again.logits(tokens), want, atol=1e-6)


def test_orbax_export_restores_onto_a_sharded_mesh(tmp_path):
  from jax.sharding import NamedSharding
  from jaxllm.checkpoint.orbax import Checkpointer
  from jaxllm.config import MeshConfig
  from jaxllm.parallel import mesh as mesh_lib, rules
  cfg = tiny_model(vocab_size=64)
  _, params = _random(cfg, 4)
  tok = tokenizer_lib.HFTokenizer(tokenizer_lib.tokenizer_from_gguf_vocab(
      ["<s>", "</s>", "a", "b"], [], [3, 3, 1, 1], "gpt2"), bos_id=0, eos_id=1)
  convert.export_orbax(convert.Checkpoint(cfg, params, tok, "test"), str(tmp_path / "o"))
  mesh = mesh_lib.make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
  _, abstract = transformer.abstract_params(cfg)
  shardings = rules.tree_shardings(transformer.logical_axes(cfg), abstract, mesh)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
  ckpt = Checkpointer(tmp_path / "o" / "checkpoints", read_only=True)
  restored = ckpt.restore_params(target)
  ckpt.close()
  q = restored["blocks"]["attn"]["q"]
  assert isinstance(q.sharding, NamedSharding) and q.sharding.spec[1] == "fsdp"
  chex.assert_trees_all_equal(jax.device_get(restored), params)


def test_gguf_tokenizer_and_chat_template():
  tok = tokenizer_lib.HFTokenizer(tokenizer_lib.tokenizer_from_gguf_vocab(
      ["<|im_start|>", "<|im_end|>", "h", "i", "hi", "\u0120", "\u0120hi"],
      ["h i", "\u0120 hi"], [3, 3, 1, 1, 1, 1, 1], "gpt2"), bos_id=0, eos_id=1)
  assert tok.encode("hi hi") == [4, 6]
  assert tok.encode("<|im_start|>hi") == [0, 4]
  assert tok.decode([0, 4, 6, 1]) == "<|im_start|>hi hi<|im_end|>"
  template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
              "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
  text = chat.render(template, [{"role": "user", "content": "hi"}], tok)
  assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_eval_windows_score_every_token_once():
  ids = list(range(100))
  for max_len, stride in ((16, 8), (16, 15), (10, 3), (200, 100)):
    scored = []
    for win, start in windows(ids, max_len, stride):
      assert len(win) <= max_len and start >= 0
      scored.extend(win[start + 1:])
    assert scored == ids[1:], (max_len, stride)


def test_corrupt_and_unsupported_files_fail_clearly(tmp_path):
  cfg = tiny_model(vocab_size=40)
  _, params = _random(cfg, 5)
  write_llama_gguf(tmp_path / "falcon.gguf", cfg, params, arch="falcon")
  with pytest.raises(UnsupportedCheckpoint, match="GGUF architecture 'falcon' is not supported"):
    jaxllm.load(tmp_path / "falcon.gguf")
  write_llama_gguf(tmp_path / "q5.gguf", cfg, params, qtype="Q5_0")
  with pytest.raises(UnsupportedCheckpoint, match="tensor type\\(s\\) Q5_0 are not supported"):
    jaxllm.load(tmp_path / "q5.gguf")
  (tmp_path / "junk.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
  with pytest.raises(UnsupportedCheckpoint, match="not a readable GGUF file"):
    jaxllm.load(tmp_path / "junk.gguf")
  hf = tmp_path / "hf"
  write_llama_gguf(tmp_path / "ok.gguf", cfg, params)
  convert.export_hf(convert.read_checkpoint(tmp_path / "ok.gguf"), str(hf))
  # The export is readable by others as its JSON files are (safetensors alone would give 600).
  mode = lambda name: (hf / name).stat().st_mode & 0o777
  assert mode("model.safetensors") == mode("config.json")
  data = (hf / "model.safetensors").read_bytes()
  (hf / "model.safetensors").write_bytes(data[: len(data) // 2])
  with pytest.raises(UnsupportedCheckpoint, match="model.safetensors is corrupt or truncated"):
    jaxllm.load(hf)
  config = json.loads((hf / "config.json").read_text())
  (hf / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
  with pytest.raises(UnsupportedCheckpoint, match="model_type 'gpt_neox' is not supported"):
    jaxllm.load(hf)


def test_cli_convert_and_eval(tmp_path):
  cfg = tiny_model(vocab_size=40)
  _, params = _random(cfg, 6)
  write_llama_gguf(tmp_path / "m.gguf", cfg, params)
  env = {**os.environ, "XLA_FLAGS": xla_flags()}
  run = lambda *a: subprocess.run([sys.executable, "-m", *a], cwd=REPO, capture_output=True,
                                  text=True, timeout=300, env=env)
  proc = run("jaxllm.convert", f"--checkpoint={tmp_path}/m.gguf", f"--out={tmp_path}/hf",
             "--format=hf")
  assert proc.returncode == 0, proc.stderr
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == {
      "format": "hf", "checkpoint": f"{tmp_path}/m.gguf", "out": f"{tmp_path}/hf"}
  # The old spellings (--src, --dst) still work, with a note naming the new ones.
  again = run("jaxllm.convert", f"--src={tmp_path}/m.gguf", f"--dst={tmp_path}/hf",
              "--format=hf")
  assert again.returncode == 2
  assert again.stderr.strip().splitlines()[-3:] == [
      "note: --src is now --checkpoint (the old spelling still works)",
      "note: --dst is now --out (the old spelling still works)",
      f"error: --out={tmp_path}/hf exists and is not empty (nothing written)"]
  (tmp_path / "a.txt").write_text("abc t5 hij " * 40)
  (tmp_path / "b.txt").write_text("zyx " * 10)
  ev = run("jaxllm.eval", f"--checkpoint={tmp_path}/hf", f"--data={tmp_path}/*.txt",
           "--max_seq_len=32", "--noprogress")
  assert ev.returncode == 0, ev.stderr
  result = json.loads(ev.stdout.strip().splitlines()[-1])
  assert result["files"] == 2 and result["tokens"] > 0
  assert np.isclose(result["ppl"], np.exp(result["loss"]))
  bad = run("jaxllm.eval", f"--checkpoint={tmp_path}/nope", f"--data={tmp_path}/*.txt")
  assert bad.returncode == 2 and "no such checkpoint" in bad.stderr
