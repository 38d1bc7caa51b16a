"""Small configs and helpers shared by tests."""

import os
import re

from jaxllm import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def documented_pages() -> list[tuple[str, str]]:
  """(path, text) of README.md, then the docs site's pages in mkdocs.yml's nav order: where
  the commands and snippets users copy are written."""
  with open(os.path.join(REPO, "mkdocs.yml")) as f:
    nav = re.findall(r"^  - [^:]+: (\S+\.md)$", f.read(), re.M)
  pages = []
  for path in ["README.md"] + [f"docs/{name}" for name in nav]:
    with open(os.path.join(REPO, path)) as f:
      pages.append((path, f.read()))
  return pages


def xla_flags(devices: int = 1) -> str:
  """XLA_FLAGS for the suite and the subprocesses it starts: `devices` simulated CPU devices and
  LLVM at -O0. The suite is mostly XLA:CPU compilation of small programs; -O0 halves compile
  times (a 2-stage pipeline bench: 68 s -> 39 s) and slows tiny programs little. Only the
  default-run test, which trains for real, keeps XLA's defaults."""
  return (f"--xla_force_host_platform_device_count={devices} "
          "--xla_backend_optimization_level=0")


def tiny_model(**overrides) -> config_lib.ModelConfig:
  values = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                d_ff=64, max_seq_len=128)
  values.update(overrides)
  return config_lib.ModelConfig(**values)


def tiny_experiment(**sections) -> config_lib.Config:
  """A seconds-long training config on the stdlib corpus (small tokenizer, small model)."""
  values = {
      "name": "test",
      "model": dict(vocab_size=384, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                    head_dim=8, d_ff=64, max_seq_len=128),
      "data": dict(tokenizer_max_sentences=20_000),
      "train": dict(steps=20, batch_size=8, seq_len=32, lr=3e-3, warmup_steps=2, log_every=1,
                    eval_every=10, eval_batches=2, checkpoint_every=10),
      "mesh": dict(data=-1),
  }
  for key, value in sections.items():
    values[key] = {**values.get(key, {}), **value}
  return config_lib.from_config_dict(values)


def greedy_by_recompute(graphdef, params, prompt, max_tokens: int, eos_id: int | None = None):
  """Reference greedy decoding: the full forward over the whole sequence for every new token
  (no KV cache, no decode loop); stops after `eos_id` is drawn (not returned), as generation
  does."""
  import jax.numpy as jnp
  from flax import nnx
  model = nnx.merge(graphdef, params)
  seq = list(prompt)
  for _ in range(max_tokens):
    token = int(jnp.argmax(model(jnp.asarray([seq], jnp.int32))[0, -1]))
    if token == eos_id:
      break
    seq.append(token)
  return seq[len(prompt):]


def greedy_by_full_forward(model, prompt: str, max_tokens: int) -> str:
  """`greedy_by_recompute`'s text for a `LoadedModel` and a text prompt: what
  `model.generate(prompt, temperature=0)` must equal."""
  return model.tokenizer.decode(greedy_by_recompute(
      model.graphdef, model.params, model.prompt_ids(prompt), max_tokens, model.tokenizer.eos_id))


def write_tiny_chat_model(dst: str, seed: int = 0) -> str:
  """A 2-layer random Llama (4.9M parameters, 4.7M of them the tied [49152, 96] embedding) with
  SmolLM2-135M's tokenizer and chat template, written as a Hugging Face directory (what
  `jaxllm.load`, the server, the benches and `transformers` read).

  For tests of serving and benchmark plumbing, where what matters is the tokenizer, the chat
  template and the paths a request takes, not what 135M trained weights say. init_std 0.5
  (logits of spread ~4) keeps greedy argmaxes decisive, so paths that differ in float32
  rounding (paged vs contiguous, batched vs alone, speculative vs plain) pick the same tokens.
  """
  import jax
  from jaxllm.checkpoint import convert
  from jaxllm.fetch import fetch
  from jaxllm.model import transformer
  tokenizer = convert.read_tokenizer(fetch("smollm2-135m"))
  # 6 query and 3 KV heads, as SmolLM2's 9 and 3: splits over tensor=2 and tensor=3 meshes.
  cfg = tiny_model(vocab_size=tokenizer.vocab_size, d_model=96, n_layers=2, n_heads=6,
                   n_kv_heads=3, head_dim=16, d_ff=192, max_seq_len=1024, tie_embeddings=True,
                   init_std=0.5)
  _, params = transformer.split(transformer.create(cfg, seed))
  convert.export_hf(convert.Checkpoint(cfg, jax.device_get(params), tokenizer, "random"), dst)
  return dst


def lora_with_updates(params: dict, cfg, seed: int = 2, scale: float = 0.3) -> dict:
  """`params` with LoRA adapters (`jaxllm.lora.adapters.LoraConfig` cfg) whose b is random, not
  zero (as after training), so that the update shows in the logits."""
  import jax
  from jaxllm.lora import adapters
  lora = adapters.add(params, cfg, seed=seed)
  found = adapters.adapters(lora)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(found))
  return adapters.with_adapters(lora, {
      path: {"a": ab["a"], "b": scale * jax.random.normal(k, ab["b"].shape)}
      for (path, ab), k in zip(found.items(), keys)})


class CharTokenizer:
  """Characters as ids 3..62 of a 64-token vocabulary (bos 1, eos 2): a tokenizer for
  fine-tuning tests on `tiny_model`."""
  bos_id, eos_id, add_bos, chat_template = 1, 2, True, None

  def encode(self, text):
    return [3 + ord(c) % 60 for c in text]

  def decode(self, ids):
    return "".join(chr(i - 3 + 32) for i in ids)
