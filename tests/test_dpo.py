"""Preference optimisation (`jaxllm.data.preference`, `jaxllm.train.preference`, `python -m
jaxllm.dpo`): a pair's rows learn the reply alone (a mask assembled by hand from SmolLM2's chat
format), the reference log-probabilities are the starting model's own (a LoRA run's first step
has loss ln 2 exactly: policy and reference agree), DPO then prefers the chosen replies on
held-out pairs, and bad pairs fail in one line before anything compiles. The losses themselves
are checked against TRL in tests/test_preference_trl.py (parity stage)."""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import jax.numpy as jnp
from flax import nnx

from jaxllm import config as config_lib
from jaxllm.checkpoint import convert
from jaxllm.data import preference as preference_data
from jaxllm.data import sft as sft_data
from jaxllm.model import transformer
from jaxllm.train import finetune, preference
from tests.helpers import CharTokenizer, tiny_model, xla_flags

CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "2 + 3?"},
                {"role": "assistant", "content": "5"},
                {"role": "user", "content": "And 4 + 4?"}]


def test_pair_rows_learn_the_reply_alone(tiny_chat_model):
  tok = convert.read_tokenizer(tiny_chat_model)
  chosen, rejected = preference_data.tokenize_pair(
      {"messages": CONVERSATION, "chosen": "8", "rejected": "9."}, tok)
  prompt = tok.encode("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2 + 3?"
                      "<|im_end|>\n<|im_start|>assistant\n")
  prompt += tok.encode("5<|im_end|>\n")  # an earlier assistant turn: context, not learned
  prompt += tok.encode("<|im_start|>user\nAnd 4 + 4?<|im_end|>\n<|im_start|>assistant\n")
  for ex, reply in ((chosen, "8"), (rejected, "9.")):
    learned = tok.encode(f"{reply}<|im_end|>\n")
    assert ex.ids.tolist() == prompt + learned
    assert ex.mask.tolist() == [0.0] * len(prompt) + [1.0] * len(learned)
  plain = preference_data.tokenize_pair({"prompt": "2+3=", "chosen": "5", "rejected": "6"},
                                        CharTokenizer())[1]
  assert plain.ids.tolist() == [1] + CharTokenizer().encode("2+3=6") + [2]
  assert plain.mask.tolist() == [0.0] * 5 + [1.0, 1.0]


def test_bad_pairs_fail_naming_their_line(tmp_path):
  for row, message in (({"prompt": "a", "chosen": "x", "rejected": " x "}, "are the same reply"),
                       ({"prompt": "a", "chosen": "x"}, "rejected must be a non-empty string"),
                       ({"chosen": "x", "rejected": "y"}, "a pair has \"prompt\""),
                       ({"messages": [], "chosen": "x", "rejected": "y"},
                        "messages must be a non-empty list")):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "ok", "chosen": "a", "rejected": "b"}) + "\n"
                    + json.dumps(row) + "\n")
    with pytest.raises(sft_data.SftDataError, match=f"pairs.jsonl:2: .*{re.escape(message)}"):
      sft_data.read_jsonl(path, preference_data.check_pair)


def _pairs(n, seed):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    a, b = (int(x) for x in rng.integers(0, 50, 2))
    # the rejected reply ends in "?": a preference a small model can learn and carry over
    out.append((i + 1, {"prompt": f"{a}+{b}=", "chosen": str(a + b),
                        "rejected": f"{a + b}?"}))
  return out


def test_reference_is_the_start_and_dpo_learns_the_preference(tmp_path):
  """With LoRA the reference is the base (adapters at zero): the first step's loss is ln 2 and
  its reward margin 0. The reference log-probabilities equal, per pair, the summed log-probs of
  the reply tokens computed here from the model's logits. After training the held-out pairs
  are preferred: reward margin > 0 and accuracy > 1/2."""
  cfg = tiny_model(init_std=0.3)
  graphdef, params = transformer.split(transformer.create(cfg, 0))
  experiment = config_lib.finetune_from_config_dict({
      "name": "t", "finetune": {"method": "lora", "eval_fraction": 0.0},
      "lora": {"rank": 8, "alpha": 16.0}, "dpo": {"loss": "sigmoid", "beta": 0.5},
      "train": {"steps": 30, "batch_size": 8, "seq_len": 16, "lr": 1e-2, "warmup_steps": 2,
                "log_every": 1, "eval_every": 30, "checkpoint_every": 30, "weight_decay": 0.0}})
  lora = finetune.prepare_params(params, experiment)
  records, held = _pairs(48, 0), _pairs(16, 1)
  data = finetune.preference_data(graphdef, lora, *[finetune.preference_pairs(r, CharTokenizer())
                                                   for r in (records, held)],
                                  experiment, lambda _: None)
  # the reference of pair 0, by hand: the base's logits, the reply tokens' log-probs summed
  model = nnx.merge(graphdef, params)
  for item in data.items[:3]:
    for row, ref in zip(item["rows"], item["reference"]):
      ids, mask = row["tokens"], row["mask"]
      logits = np.asarray(model(jnp.asarray(ids[None, :-1])), np.float64)[0]
      logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                               keepdims=True)) \
          - logits.max(-1, keepdims=True)
      want = float(np.sum(logp[np.arange(len(ids) - 1), ids[1:]] * mask[1:]))
      np.testing.assert_allclose(ref, want, rtol=1e-5)
  result = finetune.fit(graphdef, lora, preference.objective(experiment.dpo), data,
                        str(tmp_path), experiment, progress=False, say=lambda _: None)
  rows = [json.loads(line) for line in open(tmp_path / finetune.METRICS_FILE)]
  first = rows[0]
  assert first["step"] == 1 and first["pairs"] == 8
  np.testing.assert_allclose(first["loss"], math.log(2.0), rtol=1e-6)
  np.testing.assert_allclose(first["reward_margin"], 0.0, atol=1e-6)
  assert result["loss"] < 0.5 * math.log(2.0)
  assert result["eval_reward_margin"] > 0 and result["eval_reward_accuracy"] > 0.5
  assert result["eval_loss"] < math.log(2.0), result


def test_dpo_command_refuses_a_pair_without_preference(tmp_path, tiny_chat_model):
  data = tmp_path / "pairs.jsonl"
  data.write_text(json.dumps({"prompt": "2+2=", "chosen": "4", "rejected": "5"}) + "\n"
                  + json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "2"}) + "\n")
  proc = subprocess.run([sys.executable, "-m", "jaxllm.dpo", f"--base={tiny_chat_model}",
                         f"--data={data}", f"--workdir={tmp_path / 'run'}", "--noprogress"],
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, "XLA_FLAGS": xla_flags(devices=1)})
  assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
      f"error: {data}:2: chosen and rejected are the same reply: nothing to prefer"], proc.stderr
  assert not (tmp_path / "run").exists()
