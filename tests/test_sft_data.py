"""Fine-tuning data (`jaxllm.data.sft`, `jaxllm.data.instructions`) against references built
here: the loss mask of multi-turn chats equals one assembled by hand from SmolLM2's chat format,
the prompt tokens equal what a chat request tokenizes, packing keeps every example whole and
alone (the packed loss equals the sum of each example's loss computed apart, in numpy), the
synthetic answers are right, and bad rows fail in one line naming their line."""

import copy
import json
import re

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm import config as config_lib
from jaxllm.checkpoint import convert
from jaxllm.data import chat as chat_lib
from jaxllm.data import instructions
from jaxllm.data import sft
from jaxllm.model import transformer
from jaxllm.train import step as step_lib
from tests.helpers import tiny_model

CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "And 4 + 4?"},
        {"role": "assistant", "content": "It is 8."}]


@pytest.fixture(scope="module")
def tokenizer(tiny_chat_model):
  return convert.read_tokenizer(tiny_chat_model)


def _hand_built(tok, chunks):
  """ids and mask of (text, learned) chunks, each tokenized alone."""
  ids, mask = [], []
  for text, learned in chunks:
    part = tok.encode(text)
    ids += part
    mask += [float(learned)] * len(part)
  return ids, mask


def test_multi_turn_mask_equals_hand_built_smollm2_format(tokenizer):
  ex = sft.tokenize({"messages": CHAT}, tokenizer)
  ids, mask = _hand_built(tokenizer, [
      ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
       "<|im_start|>assistant\n", False),
      ("5<|im_end|>\n", True),
      ("<|im_start|>user\nAnd 4 + 4?<|im_end|>\n<|im_start|>assistant\n", False),
      ("It is 8.<|im_end|>\n", True)])
  assert ex.ids.tolist() == ids
  assert ex.mask.tolist() == mask
  # The template's default system prompt comes in when the chat has none; still unlearned.
  ex = sft.tokenize({"messages": CHAT[1:3]}, tokenizer)
  ids, mask = _hand_built(tokenizer, [
      ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
       "Face<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n",
       False), ("5<|im_end|>\n", True)])
  assert (ex.ids.tolist(), ex.mask.tolist()) == (ids, mask)
  assert sft.tokenize({"messages": CHAT}, tokenizer, loss_on="all").mask.min() == 1.0


def test_prompt_tokens_are_those_of_a_chat_request(tokenizer):
  """Before each assistant turn the ids are what serving tokenizes for that conversation."""
  ex = sft.tokenize({"messages": CHAT}, tokenizer)
  for i in (2, 4):
    request = tokenizer.encode(chat_lib.render(tokenizer.chat_template, CHAT[:i], tokenizer))
    assert ex.ids[:len(request)].tolist() == request
    assert ex.mask[:len(request)].max() == (0.0 if i == 2 else 1.0)
    assert ex.mask[len(request)] == 1.0  # the reply's first token is learned


def test_prompt_completion(tokenizer):
  ex = sft.tokenize({"prompt": "2 + 3 =", "completion": " 5"}, tokenizer)
  prompt, completion = tokenizer.encode("2 + 3 ="), tokenizer.encode(" 5") + [tokenizer.eos_id]
  assert ex.ids.tolist() == prompt + completion
  assert ex.mask.tolist() == [0.0] * len(prompt) + [1.0] * len(completion)


def test_bad_rows_fail_naming_their_line(tmp_path, tokenizer):
  cases = {
      '{"messages": [{"role": "user", "content": "hi"}]}': "no assistant turn",
      '{"messages": [{"role": "robot", "content": "hi"}]}': "messages[0] must be",
      '{"prompt": "a"}': "completion must be a string",
      '{"text": "a"}': "an example has",
      '{"prompt": "a", "completion": ""}': "empty completion",
      "not json": "not JSON",
  }
  for row, message in cases.items():
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "fine", "completion": "row"}) + "\n\n" + row + "\n")
    with pytest.raises(sft.SftDataError, match=f"bad.jsonl:3: .*{re.escape(message)}"):
      sft.read_jsonl(path)
  with pytest.raises(sft.SftDataError, match="no examples"):
    (tmp_path / "empty.jsonl").write_text("\n")
    sft.read_jsonl(tmp_path / "empty.jsonl")
  broken = copy.copy(tokenizer)
  broken.chat_template = "{{ raise_exception('roles must alternate') }}"
  with pytest.raises(sft.SftDataError, match="line 7: chat template failed: roles must alt"):
    sft.tokenize({"messages": CHAT}, broken, line=7)
  # A template that puts the newest turn first renders no prefixes: its turns cannot be found.
  broken.chat_template = ("{% for m in messages | reverse %}{{ m['role'] }}: {{ m['content'] }}"
                          "\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
  with pytest.raises(sft.SftDataError, match="not render a conversation's turns as prefixes"):
    sft.tokenize({"messages": CHAT}, broken)
  broken.chat_template = None
  with pytest.raises(sft.SftDataError, match="has none"):
    sft.tokenize({"messages": CHAT}, broken)


def _examples(rng, n, vocab):
  out = []
  for i in range(n):
    length = int(rng.integers(4, 40))
    mask = (rng.random(length) < 0.6).astype(np.float32)
    mask[-1] = 1.0
    out.append(sft.Example(rng.integers(3, vocab, length).astype(np.int32), mask, i, {}))
  return out


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_packed_loss_equals_each_example_alone():
  """Packing changes no example's loss: the packed batch's summed NLL and weight equal, in
  numpy, the sums over each example run through the model by itself (attention never crosses
  examples, positions restart, targets learned where the mask says). A 40-token example in rows
  of 33 is cut to its first 33 tokens."""
  cfg = tiny_model(init_std=0.3)
  graphdef, params = transformer.split(transformer.create(cfg, 0))
  model = nnx.merge(graphdef, params)
  examples = _examples(np.random.default_rng(0), 12, cfg.vocab_size)
  rows, cut = sft.pack(examples, seq_len=32)
  assert cut == sum(len(e.ids) > 33 for e in examples)
  assert sum(len(np.unique(r["segment_ids"][r["segment_ids"] > 0])) for r in rows) == 12
  batch = sft.to_batch(rows)
  nll, weight = step_lib.make_eval_step(graphdef)(params, jax.tree.map(jnp.asarray, batch))
  # Each example alone at positions 0.., padded at its end (a causal model's earlier
  # positions cannot see the padding), all in one forward pass.
  alone = np.zeros((len(examples), 32), np.int32)
  for i, e in enumerate(examples):
    n = min(len(e.ids), 33) - 1
    alone[i, :n] = e.ids[:n]
  logits_all = np.asarray(model(jnp.asarray(alone)), np.float64)
  want_nll = want_weight = 0.0
  for e, logits in zip(examples, logits_all):
    ids, mask = e.ids[:33], e.mask[:33]
    logp = _log_softmax(logits[:len(ids) - 1])[np.arange(len(ids) - 1), ids[1:]]
    want_nll -= float(np.sum(logp * mask[1:]))
    want_weight += float(mask[1:].sum())
  np.testing.assert_allclose(float(weight), want_weight)
  np.testing.assert_allclose(float(nll), want_nll, rtol=2e-5)


def test_batches_read_every_row_once_per_epoch():
  rows, _ = sft.pack(_examples(np.random.default_rng(1), 30, 50), seq_len=16)
  n, b = len(rows), 2
  seen = [tuple(r) for step in range(n // b)
          for r in sft.batch_at(rows, step, b, seed=3)["inputs"].tolist()]
  assert sorted(seen) == sorted(tuple(r["tokens"][:-1].tolist()) for r in rows)
  # a pure function of the step: the iterator started late reads what the early one reads there
  late = next(sft.batches(rows, b, 3, start=5))
  early = sft.batches(rows, b, 3)
  for _ in range(5):
    next(early)
  np.testing.assert_array_equal(next(early)["targets"], late["targets"])


def test_held_out_split_is_seeded_and_disjoint():
  records = [(i + 1, {"prompt": str(i), "completion": "x"}) for i in range(20)]
  train, held = sft.split_examples(records, 0.25, seed=0)
  assert len(held) == 5 and len(train) == 15
  assert sorted(train + held) == records
  assert sft.split_examples(records, 0.25, seed=0)[1] == held
  assert sft.split_examples(records, 0.25, seed=1)[1] != held


def test_synthetic_answers_are_right():
  rows = instructions.problems(60, seed=4)
  assert {r["task"] for r in rows} == set(instructions.TASKS)
  for r in rows:
    p, good = r["question"], r["answer"]
    assert r["wrong"] != good
    if r["task"] == "add":
      a, b = map(int, re.findall(r"(\d+) \+ (\d+)", p)[0])
      assert good == str(a + b)
    elif r["task"] == "multiply":
      a, b = map(int, re.findall(r"(\d+) times (\d+)", p)[0])
      assert good == str(a * b)
    elif r["task"] == "sort":
      xs = [int(x) for x in p.split(": ")[1].split(", ")]
      assert good == ", ".join(map(str, sorted(xs)))
    elif r["task"] == "upper":
      assert good == p.split(": ")[1].upper()
    elif r["task"] == "reverse_words":
      assert good == " ".join(p.split(": ")[1].split()[::-1])
    else:
      assert good == re.findall(r"in (\d{4})\.\"$", p)[0]
  chats, pairs = instructions.chats(6, seed=4), instructions.pairs(6, seed=4)
  assert [c["messages"][-1]["content"] for c in chats] == [r["answer"] for r in rows[:6]]
  assert [(p["messages"], p["chosen"]) for p in pairs] == [(c["messages"][:-1],
                                                            c["messages"][-1]["content"])
                                                           for c in chats]
  assert [p["rejected"] for p in pairs] == [r["wrong"] for r in rows[:6]]


def test_finetune_experiment_config_errors():
  good = {"name": "x", "finetune": {"method": "qlora"}, "lora": {"rank": 4},
          "dpo": {"loss": "ipo"}, "train": {"steps": 3}}
  e = config_lib.finetune_from_config_dict(good)
  assert (e.finetune.method, e.lora.rank, e.dpo.loss, e.train.steps) == ("qlora", 4, "ipo", 3)
  for bad, message in (({"model": {}}, "unknown config section 'model'"),
                       ({"finetune": {"method": "adapters"}}, "finetune.method='adapters'"),
                       ({"lora": {"r": 4}}, "unknown config key lora.r"),
                       ({"lora": {"base_bits": 3}}, "lora.base_bits=3"),
                       ({"dpo": {"loss": "kto"}}, "dpo.loss='kto'"),
                       ({"dpo": {"beta": 0.0}}, "dpo.beta=0.0"),
                       ({"train": {"steps": 0}}, "train.steps")):
    with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
      config_lib.finetune_from_config_dict(bad)
