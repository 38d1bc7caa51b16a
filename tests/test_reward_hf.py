"""A reward model exported as a Hugging Face sequence-classification model (`jaxllm convert
--format=hf-reward`, `jaxllm.train.reward.export_hf`) against `transformers` (a parity test:
torch and transformers from the parity extra): a LoRA reward model on a tiny Llama with
SmolLM2's tokenizer, written with its adapters merged, loads in
`AutoModelForSequenceClassification` and scores chat sequences as jaxllm's `sequence_scores`
does; `jaxllm.rl.rewards.read_reward_model` reads the directory back to the same scores."""

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jaxllm  # noqa: E402
from jaxllm.lora import adapters, peft_format  # noqa: E402
from jaxllm.rl import rewards  # noqa: E402
from jaxllm.train import reward  # noqa: E402
from tests import helpers  # noqa: E402


def _ours(model, head, rows):
  out = []
  for ids in rows:
    T = len(ids)
    batch = {"inputs": jnp.asarray([ids], jnp.int32),
             "positions": jnp.arange(T, dtype=jnp.int32)[None],
             "segment_ids": jnp.ones((1, T), jnp.int32), "last": jnp.asarray([T - 1])}
    out.append(float(reward.sequence_scores(model.graphdef, {"model": model.params,
                                                              reward.HEAD: head}, batch)[0]))
  return np.asarray(out)


def test_exported_reward_model_scores_as_transformers_does(tmp_path):
  base_dir = helpers.write_tiny_chat_model(str(tmp_path / "base"))
  base = jaxllm.load(base_dir)
  lcfg = adapters.LoraConfig(targets=("q", "v", "down"), rank=4, alpha=8.0)
  params = helpers.lora_with_updates(base.params, lcfg, seed=4, scale=0.05)
  head = 0.1 * jax.random.normal(jax.random.PRNGKey(7), (base.config.d_model,))
  # A `jaxllm reward` result: the adapter and the head beside it
  result = tmp_path / "run" / "adapter"
  peft_format.save(str(result), params, base.config, base_model=base_dir)
  reward.save_head(str(result / "score.safetensors"), {reward.HEAD: head})
  out = tmp_path / "hf"
  done = subprocess.run([sys.executable, "-m", "jaxllm.convert", f"--checkpoint={tmp_path / 'run'}",
                         f"--out={out}", "--format=hf-reward"], capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-2000:]

  records = [{"messages": [{"role": "user", "content": "What is 2 + 2?"}]},
             {"prompt": "Sort 3, 1, 2:"}]
  from jaxllm.data import preference
  rows = [preference.reply_example(r, c, base.tokenizer).ids.tolist()
          for r, c in zip(records, ["4", "1, 2, 3"])]
  loaded = jaxllm.load(base_dir, adapter=str(result))
  ours = _ours(loaded, head, rows)

  hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(out))
  hf.eval()
  with torch.no_grad():
    theirs = np.array([float(hf(torch.tensor([ids])).logits[0, 0]) for ids in rows])
  np.testing.assert_allclose(ours, theirs, atol=1e-4)
  assert np.abs(ours).max() > 1e-3  # the scores are not trivially zero

  back, back_head = rewards.read_reward_model(str(out))
  np.testing.assert_allclose(_ours(back, back_head, rows), ours, atol=1e-4)
  score = rewards.load_reward_model(str(out), max_seq_len=64)
  np.testing.assert_allclose(score(records, ["4", "1, 2, 3"]), ours, atol=1e-4)
