"""Sampling, KV-cached generation against a recompute-everything reference, load and CLI."""

import os
import subprocess
import sys

import chex
import numpy as np
import pytest

import jax
import jax.numpy as jnp

import jaxllm
from jaxllm.inference import generate as generate_lib
from jaxllm.inference import sampling, text_stream
from jaxllm.model import transformer
from jaxllm.train import loop
from tests.helpers import (REPO, greedy_by_full_forward, greedy_by_recompute, xla_flags,
                           tiny_experiment, tiny_model)



def test_greedy_and_top_k_1_are_argmax():
  logits = jax.random.normal(jax.random.PRNGKey(0), (5, 50))
  want = jnp.argmax(logits, -1)
  for seed in range(3):
    key = jax.random.PRNGKey(seed)
    np.testing.assert_array_equal(sampling.sample(logits, key, temperature=0.0), want)
    np.testing.assert_array_equal(sampling.sample(logits, key, temperature=1.0, top_k=1), want)


def test_top_p_keeps_the_nucleus():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  kept = lambda p: np.isfinite(np.asarray(sampling.filter_logits(logits, top_p=p))) & (
      np.asarray(sampling.filter_logits(logits, top_p=p)) > -1e29)
  np.testing.assert_array_equal(kept(0.4), [[True, False, False, False]])
  np.testing.assert_array_equal(kept(0.7), [[True, True, False, False]])
  np.testing.assert_array_equal(kept(0.9), [[True, True, True, False]])
  np.testing.assert_array_equal(kept(1.0), [[True, True, True, True]])


def test_sampling_follows_the_distribution():
  probs = np.array([0.5, 0.3, 0.15, 0.05])
  logits = jnp.log(jnp.asarray(probs))[None].repeat(4000, 0)
  draws = np.asarray(sampling.sample(logits, jax.random.PRNGKey(1), temperature=1.0))
  freq = np.bincount(draws, minlength=4) / len(draws)
  np.testing.assert_allclose(freq, probs, atol=0.03)
  top2 = np.asarray(sampling.sample(logits, jax.random.PRNGKey(2), temperature=1.0, top_k=2))
  assert set(np.unique(top2)) == {0, 1}
  np.testing.assert_allclose(np.mean(top2 == 0), 0.5 / 0.8, atol=0.03)


def test_cached_greedy_generation_equals_recompute():
  cfg = tiny_model()
  graphdef, params = transformer.split(transformer.create(cfg, 3))
  prompts = [[5, 9, 2, 33], [7, 1, 8, 8, 3, 10, 11, 40, 2, 6, 1, 1, 9, 20, 4, 17, 3]]
  out = generate_lib.generate(graphdef, params, prompts, max_tokens=12, temperature=0.0)
  for prompt, got in zip(prompts, out):
    assert got == greedy_by_recompute(graphdef, params, prompt, 12)


def test_seeded_sampling_is_reproducible_and_stops_at_eos():
  cfg = tiny_model()
  graphdef, params = transformer.split(transformer.create(cfg, 4))
  run = lambda seed: generate_lib.generate(graphdef, params, [[1, 2, 3]], max_tokens=20,
                                           temperature=1.0, seed=seed)[0]
  assert run(7) == run(7)
  assert run(7) != run(8)
  first = run(7)
  stopped = generate_lib.generate(graphdef, params, [[1, 2, 3]], max_tokens=20, temperature=1.0,
                                  seed=7, eos_id=first[5])[0]
  assert stopped == first[:first.index(first[5])]


def test_generation_length_is_checked():
  cfg = tiny_model(max_seq_len=32)
  graphdef, params = transformer.split(transformer.create(cfg, 0))
  with pytest.raises(ValueError, match="exceeds the model's max_seq_len 32"):
    generate_lib.generate(graphdef, params, [[1] * 20], max_tokens=20, max_seq_len=32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("gen"))
  result = loop.train(tiny_experiment(train=dict(steps=10, checkpoint_every=5)), workdir,
                      progress=False)
  return workdir, result


def test_load_workdir_and_step(trained):
  workdir, result = trained
  model = jaxllm.load(workdir)
  chex.assert_trees_all_equal(jax.device_get(model.params), jax.device_get(result["params"]))
  early = jaxllm.load(os.path.join(workdir, "checkpoints", "5"))
  assert not np.array_equal(early.params["embed"], model.params["embed"])
  ids = [model.tokenizer.bos_id, *model.tokenizer.encode("def f(x):")]
  logits = model.logits([ids])
  chex.assert_shape(logits, (1, len(ids), model.config.vocab_size))
  text = model.generate("def f(x):", max_tokens=5, temperature=0.0)
  assert text == greedy_by_full_forward(model, "def f(x):", 5)
  full = model.generate("def f(x):", max_tokens=12, temperature=0.0, details=True)
  assert full.text == model.tokenizer.decode(full.tokens) and len(full.logprobs) == 12
  stop = full.text[len(full.text) // 2:][:2]
  cut = model.generate("def f(x):", max_tokens=12, temperature=0.0, stop=[stop], details=True)
  assert cut.text == full.text[:full.text.index(stop)] and cut.finish_reason == "stop"
  assert model.generate("def f(x):", max_tokens=12, draft=model.draft("ngram:2")) == full.text
  # Streamed (the command line's --stream): pieces written while decoding runs, adding up to
  # the final text, stop string cut; plain and speculative loops alike.
  for draft, stops, want in ((None, [], full.text), (model.draft("ngram:2"), [], full.text),
                             (None, [stop], cut.text)):
    pieces = []
    stream = text_stream.TextStream(model.tokenizer.decode, stops, write=pieces.append)
    text = model.generate("def f(x):", max_tokens=12, temperature=0.0, stop=stops,
                          on_tokens=stream, draft=draft)
    written_while_decoding = len(pieces)
    stream.finish(text)
    assert text == want and "".join(pieces) == text, pieces
    assert written_while_decoding >= 2 or stops, pieces  # it streamed, in pieces


def test_streamed_text_is_always_a_prefix_of_the_final_text():
  assert text_stream.sendable("ab\ufffd") is None  # an incomplete character waits
  assert text_stream.sendable("the end", ("ending", "x")) == "the "  # "end" may become "ending"
  assert text_stream.sendable("a STOP b", ("STOP",)) == "a "
  assert text_stream.stop_holdback("the end", ("ending", "x")) == 3
  # A byte-fallback character in two tokens (9, 10: "\u00e9"), and a tokenizer that rewrites
  # the text it has shown (Hugging Face's clean_up_tokenization_spaces: " ." becomes ".").
  pieces = {1: "ab", 2: " ", 3: ".", 9: "", 10: ""}

  def decode(ids):
    text = "".join(pieces[i] for i in ids)
    if 9 in ids:
      text += "\u00e9" if 10 in ids else "\ufffd"
    return text.replace(" .", ".")

  for ids, final in (([1, 9, 10, 2, 3], "ab\u00e9."), ([1, 2, 1], "ab ab")):
    shown = []
    stream = text_stream.TextStream(decode, write=shown.append)
    for n in range(1, len(ids) + 1):
      stream(np.asarray([ids + [0] * 4]), np.asarray([n]))
      assert final.startswith("".join(shown)) and "\ufffd" not in "".join(shown)
    stream.finish(final)
    assert "".join(shown) == final


def test_chat_command_holds_a_streamed_conversation(tiny_chat_model):
  """`jaxllm chat`: one message per stdin line (blank lines skipped), each answered through the
  chat template with the turns before it, the text streamed; the same replies as the library."""
  script = os.path.join(os.path.dirname(sys.executable), "jaxllm")
  proc = subprocess.run([script, "chat", f"--checkpoint={tiny_chat_model}", "--temperature=0",
                         "--max_tokens=6", "--stream"], input="hello there\n\nwhat is 2+2?\n",
                        cwd=REPO, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "XLA_FLAGS": xla_flags()})
  assert proc.returncode == 0, proc.stderr
  model = jaxllm.load(tiny_chat_model)
  messages, want = [], ""
  for message in ("hello there", "what is 2+2?"):
    messages.append({"role": "user", "content": message})
    reply = model.generate([model.chat_ids(messages)], max_tokens=6, temperature=0.0,
                           details=True)[0].text
    messages.append({"role": "assistant", "content": reply})
    want += reply + "\n"
  assert proc.stdout == want
