"""Reinforcement learning (`jaxllm.rl`): GRPO's and PPO's advantages, losses and gradients
against numpy written from the papers' formulas; rewards from code (exact match, numbers,
regex, unit tests in a subprocess) with failures, timeouts and NaN counted, not crashing; the
engine's log-probabilities of its samples against the trainer's forward pass; the engine
sampling from the new weights after an update; the loop's KL of 0 at step 0, its resume after
a preemption to the same numbers, and the `jaxllm rl` command end to end. TRL's GRPO loss on
the same inputs: tests/test_rl_trl.py (parity stage)."""

import json
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import RlConfig
from jaxllm.lora import adapters
from jaxllm.model import transformer
from jaxllm.rl import losses, rewards, rollout
from jaxllm.rl import prompts as prompts_lib
from tests import helpers

RNG = np.random.default_rng(0)


# ---- numpy references -----------------------------------------------------------------------

def np_group_advantages(r, valid, scale):
  out = np.zeros_like(r)
  for p in range(r.shape[0]):
    idx = np.flatnonzero(valid[p])
    if not len(idx):
      continue
    g = r[p, idx]
    std = g.std(ddof=1) if len(idx) > 1 else 0.0
    out[p, idx] = (g - g.mean()) / (std + 1e-4) if scale else g - g.mean()
  return out


def np_gae(rew, val, mask, gamma, lam):
  N, T = rew.shape
  adv = np.zeros_like(rew)
  for i in range(N):
    idx = np.flatnonzero(mask[i])
    running = 0.0
    for j in reversed(range(len(idx))):
      t = idx[j]
      v_next = val[i, idx[j + 1]] if j + 1 < len(idx) else 0.0
      running = rew[i, t] + gamma * v_next - val[i, t] + gamma * lam * running
      adv[i, t] = running
  return adv, (adv + val) * mask


def np_token_loss(lp, old, ref, adv, eps_lo, eps_hi, beta):
  """Loss per token and its derivative with respect to lp, from the formulas."""
  r = np.exp(lp - old)
  unclipped, clipped = r * adv, np.clip(r, 1 - eps_lo, 1 + eps_hi) * adv
  pg = -np.minimum(unclipped, clipped)
  # the gradient flows through the unclipped term where it is the smaller one
  d_pg = np.where(unclipped <= clipped, -r * adv, 0.0)
  kl = np.exp(ref - lp) - (ref - lp) - 1
  d_kl = 1 - np.exp(ref - lp)
  return pg + beta * kl, d_pg + beta * d_kl


def np_aggregate(x, mask, loss_type, L):
  tokens = mask.sum(1)
  if loss_type == "grpo":
    return ((x * mask).sum(1) / np.maximum(tokens, 1)).sum() / (tokens > 0).sum()
  if loss_type == "dr_grpo":
    return (x * mask).sum() / ((tokens > 0).sum() * L)
  return (x * mask).sum() / tokens.sum()


def _completion_mask(N, T):
  mask = np.zeros((N, T))
  for i in range(N):
    start = RNG.integers(1, 4)
    mask[i, start:RNG.integers(start + 1, T + 1)] = 1
  mask[-1] = 0  # a padding row (a completion whose reward failed)
  return mask


def test_group_advantages_and_gae_equal_numpy():
  r = RNG.normal(size=(5, 4))
  r[2] = 0.7  # a group of identical rewards: advantages 0
  valid = RNG.random((5, 4)) > 0.2
  valid[3] = [True, False, False, False]
  for scale in (True, False):
    got = np.asarray(losses.group_advantages(jnp.asarray(r, jnp.float32),
                                             jnp.asarray(valid), scale))
    np.testing.assert_allclose(got, np_group_advantages(r, valid, scale), atol=1e-5)
  assert np.all(got[2] == 0)
  N, T = 6, 12
  mask = _completion_mask(N, T)
  rew, val = RNG.normal(size=(N, T)) * mask, RNG.normal(size=(N, T))
  for gamma, lam in ((1.0, 0.95), (0.9, 0.5)):
    adv, ret = losses.gae(jnp.asarray(rew, jnp.float32), jnp.asarray(val, jnp.float32),
                          jnp.asarray(mask), gamma, lam)
    ref_adv, ref_ret = np_gae(rew, val, mask, gamma, lam)
    np.testing.assert_allclose(np.asarray(adv), ref_adv, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ret), ref_ret, atol=1e-5)
  # PPO's per-token reward: -beta (old - ref) on every token, the score on the last one
  old, ref = RNG.normal(size=(N, T)), RNG.normal(size=(N, T))
  scores = RNG.normal(size=N)
  got = np.asarray(losses.ppo_token_rewards(jnp.asarray(scores, jnp.float32),
                                            jnp.asarray(old, jnp.float32),
                                            jnp.asarray(ref, jnp.float32), jnp.asarray(mask),
                                            0.05))
  want = -0.05 * (old - ref) * mask
  for i in range(N):
    if mask[i].any():
      want[i, np.flatnonzero(mask[i])[-1]] += scores[i]
  np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("loss_type", ["grpo", "token", "dr_grpo"])
def test_grpo_loss_and_gradient_equal_numpy(loss_type):
  N, T, L = 6, 10, 10
  mask = _completion_mask(N, T)
  old = -RNG.gamma(2.0, 0.5, (N, T))
  lp = old + RNG.normal(0, 0.3, (N, T))  # some ratios outside the clip range
  ref = old + RNG.normal(0, 0.2, (N, T))
  adv = np.repeat(RNG.normal(size=(N, 1)), T, axis=1) * mask
  cfg = RlConfig(loss_type=loss_type, clip_eps=0.2, clip_eps_high=0.28, kl_beta=0.04,
                 max_new_tokens=L)

  def ours(lp_):
    per_token, _ = losses.clipped_token_losses(lp_, jnp.asarray(old, jnp.float32),
                                               jnp.asarray(ref, jnp.float32),
                                               jnp.asarray(adv, jnp.float32), 0.2, 0.28, 0.04)
    total, weight = losses.aggregate(per_token, jnp.asarray(mask, jnp.float32), loss_type, L)
    return total / weight

  loss, grad = jax.value_and_grad(ours)(jnp.asarray(lp, jnp.float32))
  per_tok, d_tok = np_token_loss(lp, old, ref, adv, 0.2, 0.28, 0.04)
  assert float(loss) == pytest.approx(np_aggregate(per_tok, mask, loss_type, L), abs=1e-5)
  # d(aggregate)/d(lp) is the aggregation's weight on each token times the token derivative
  weights = np.zeros_like(mask)
  for i in range(N):
    for t in range(T):
      e = np.zeros_like(mask)
      e[i, t] = 1
      weights[i, t] = np_aggregate(e, mask, loss_type, L)
  np.testing.assert_allclose(np.asarray(grad), weights * d_tok, atol=1e-5)
  assert losses.objective(cfg).weight_name == ("tokens" if loss_type == "token"
                                               else "completions")


def test_ppo_value_loss_equals_numpy():
  N, T = 4, 6
  v, v_old, ret = RNG.normal(size=(3, N, T))
  got = np.asarray(losses.value_losses(*(jnp.asarray(x, jnp.float32) for x in (v, v_old, ret)),
                                       0.2))
  clipped = v_old + np.clip(v - v_old, -0.2, 0.2)
  np.testing.assert_allclose(got, 0.5 * np.maximum((v - ret) ** 2, (clipped - ret) ** 2),
                             atol=1e-5)


# ---- rewards --------------------------------------------------------------------------------

def _hangs(record, text):
  time.sleep(30)
  return 1.0


def _flaky(record, text):
  """Raises for a reply with "B", NaN for one with "N" (CharTokenizer's text is upper case)."""
  if "B" in text.upper():
    raise RuntimeError("bad reply")
  return float("nan") if "N" in text.upper() else 0.5


def test_rewards_from_code_and_their_failures_are_counted():
  rec = {"answer": "42", "pattern": r"^\d+$", "tests": "assert add(2, 3) == 5"}
  assert rewards.exact_match(rec, " 42. ") == 1.0 and rewards.exact_match(rec, "4 2") == 0.0
  assert rewards.final_number(rec, "6 x 7 = 42") == 1.0
  assert rewards.final_number(rec, "42 or 43") == 0.0
  assert rewards.regex(rec, "42") == 1.0 and rewards.regex(rec, "x42") == 0.0
  good = "Here:\n```python\ndef add(a, b):\n  return a + b\n```"
  assert rewards.unit_test(rec, good) == 1.0
  assert rewards.unit_test(rec, "def add(a, b):\n  return a - b") == 0.0
  with pytest.raises(rewards.RewardTimeout):
    rewards.unit_test(rec, "while True: pass", timeout_s=1.0)
  scorer = rewards.Scorer(["exact_match", "tests.test_rl:_flaky"], weights=["2", "1"],
                          timeout_s=1.0)
  s = scorer.score([rec] * 3, ["42", "a B", "no"])
  np.testing.assert_allclose(s.rewards, [2.5, np.nan, np.nan])
  assert s.failures == {"error": 1, "timeout": 0, "nan": 1}
  began = time.monotonic()
  s = rewards.Scorer(["tests.test_rl:_hangs"], timeout_s=0.5).score([rec] * 4, ["a"] * 4)
  assert time.monotonic() - began < 5 and s.failures["timeout"] == 4
  assert np.isnan(s.rewards).all()
  with pytest.raises(ValueError, match="neither"):
    rewards.resolve("no_such_reward")
  with pytest.raises(ValueError, match="p.jsonl:2: reward exact_match needs.*answer"):
    rewards.check_records([(1, {"prompt": "x", "answer": "1"}), (2, {"prompt": "y"})],
                          ["exact_match"], "p.jsonl")


# ---- the engine inside the loop ---------------------------------------------------------------

@pytest.fixture(scope="module")
def policy():
  """A tiny model with LoRA adapters whose b is nonzero (as after training)."""
  cfg = helpers.tiny_model(max_seq_len=64, init_std=0.5)
  graphdef, params = transformer.split(transformer.create(cfg, 0))
  lcfg = adapters.LoraConfig(targets=("q", "v", "down"), rank=4, alpha=8.0)
  return graphdef, helpers.lora_with_updates(params, lcfg, seed=3), lcfg, params


def test_engine_logprobs_equal_the_trainers_forward(policy):
  graphdef, params, _, _ = policy
  sampler = rollout.Sampler(graphdef, params, eos_id=2, max_seq_len=48, max_slots=4)
  prompts = [[1, 5, 9, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 3]] * 3 + [[1, 7]]
  comps, stats = sampler.sample(params, prompts, [11, 12, 13, 14], max_tokens=12)
  assert stats["tokens"] == sum(len(c.tokens) for c in comps) > 0
  assert stats["prefix_pages"] >= 1  # the group's shared prompt page was reused
  batch = rollout.rows(comps, 32, eos_id=2)
  logp, _, _ = losses.policy_outputs(graphdef, params,
                                     {k: jnp.asarray(batch[k]) for k in losses.INPUT_KEYS})
  gap = np.abs(np.asarray(logp) - batch["sampled_logps"]) * batch["sampled_mask"]
  assert batch["sampled_mask"].sum() == stats["tokens"]
  assert gap.max() < 1e-4, gap.max()


def test_engine_samples_from_the_new_weights_after_an_update(policy):
  graphdef, params, _, base = policy
  sampler = rollout.Sampler(graphdef, params, eos_id=-1, max_seq_len=40, max_slots=2)
  prompt = [1, 4, 8, 15, 16, 23, 42, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
  before, _ = sampler.sample(params, [prompt], [0], max_tokens=8, temperature=0.0)
  found = adapters.adapters(params)
  updated = adapters.with_adapters(params, {p: {"a": ab["a"], "b": -3.0 * ab["b"]}
                                            for p, ab in found.items()})
  after, _ = sampler.sample(updated, [prompt], [0], max_tokens=8, temperature=0.0)
  assert after[0].tokens == helpers.greedy_by_recompute(graphdef, updated, prompt, 8)
  assert after[0].tokens != before[0].tokens
  assert before[0].tokens == helpers.greedy_by_recompute(graphdef, params, prompt, 8)
  # weights of another shape would not fit the compiled steps: refused, engine untouched
  with pytest.raises(ValueError, match="structure"):
    sampler.engine.set_params(base)


# ---- the loop -----------------------------------------------------------------------------

def _has_answer(record, text):
  """A toy verifiable reward: the record's answer letter is in the reply."""
  return float(record["answer"] in text)


def _loop_run(policy, workdir, steps, algorithm="grpo", on_step=None, reward="first"):
  from jaxllm import config as config_lib
  from jaxllm.rl import loop
  graphdef, _, lcfg, base = policy
  tok = helpers.CharTokenizer()
  records = [{"prompt": f"Q{i}", "answer": "AEIOU"[i % 5]} for i in range(6)]
  prompts = prompts_lib.Prompts(records, [[1] + tok.encode(r["prompt"]) for r in records])
  exp = config_lib.finetune_from_config_dict({
      "rl": dict(algorithm=algorithm, prompts_per_step=2, group_size=3, max_new_tokens=6,
                 minibatches=2, epochs=2, max_slots=6, kl_beta=0.1),
      "train": dict(steps=steps, seq_len=16, lr=3e-3, warmup_steps=0, checkpoint_every=2,
                    eval_every=100, seed=1)})
  # a copy: the train step donates its state, the frozen base included
  params = adapters.add(jax.tree.map(jnp.copy, base), lcfg, seed=0)
  if algorithm == "ppo":
    params = losses.init_value_head(params, 32)
  name = {"first": "tests.test_rl:_has_answer", "flaky": "tests.test_rl:_flaky"}
  scorer = rewards.Scorer([name[reward]])
  return loop.train(graphdef, params, tok, prompts, prompts_lib.Prompts([], []), scorer, workdir,
                    exp, progress=False, say=lambda m: None, on_step=on_step)


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_grpo_loop_starts_at_kl_zero_and_resumes_a_preemption_exactly(policy, tmp_path):
  whole = _loop_run(policy, str(tmp_path / "whole"), 4)
  rows = _metrics(str(tmp_path / "whole"))
  # The first rollout samples from the reference itself (LoRA's b starts at 0)
  assert rows[0]["rollout_kl"] == 0.0
  assert rows[-1]["rollout_kl"] > 0 and rows[-1]["kl"] > 0  # the policy has moved
  assert any(r["zero_advantage_groups"] < 2 for r in rows)  # on rewards that differed
  for key in ("reward_mean", "reward_std", "kl", "entropy", "clip_fraction",
              "response_length", "rollout_tokens_per_s", "train_tokens_per_s", "rollout_s",
              "update_s", "logprob_mismatch_max"):
    assert all(np.isfinite(r[key]) for r in rows), key
  assert max(r["logprob_mismatch_max"] for r in rows) < 1e-4

  def preempt(step):
    if step == 2:  # a preemption's signal, caught: the run saves step 2 and stops
      os.kill(os.getpid(), signal.SIGTERM)
  part = _loop_run(policy, str(tmp_path / "resumed"), 4, on_step=preempt)
  assert part["preempted_by"] == signal.SIGTERM and part["checkpoint_step"] == 2
  resumed = _loop_run(policy, str(tmp_path / "resumed"), 4)
  assert os.listdir(tmp_path / "resumed" / "tb")  # TensorBoard events beside metrics.jsonl
  chex.assert_trees_all_equal(adapters.adapters(resumed["params"]),
                              adapters.adapters(whole["params"]))
  assert _metrics(str(tmp_path / "resumed"))[-1]["reward_mean"] == rows[-1]["reward_mean"]


def test_ppo_loop_with_failing_rewards_skips_them_and_trains(policy, tmp_path):
  # Replies with "B" raise, with "N" score NaN: those completions are left out, counted.
  result = _loop_run(policy, str(tmp_path / "ppo"), 2, algorithm="ppo", reward="flaky")
  rows = _metrics(str(tmp_path / "ppo"))
  assert all(np.isfinite(r["loss"]) and np.isfinite(r["value_loss"]) for r in rows)
  skipped = sum(r["skipped_completions"] for r in rows)
  assert skipped == sum(r["reward_error_failures"] + r["reward_nan_failures"] for r in rows)
  assert skipped > 0
  assert set(result["params"]) == {"model", "score"}
  assert float(jnp.abs(result["params"]["score"]).sum()) > 0  # the value head trained


# ---- the command --------------------------------------------------------------------------

def test_rl_command_trains_and_refuses_bad_input(tmp_path):
  """`jaxllm rl` on a tiny chat model: metrics.jsonl's keys, held-out reward before/after, the
  adapter written; too-long prompts left out with a count; bad configs fail in one line."""
  model = helpers.write_tiny_chat_model(str(tmp_path / "model"))
  data = tmp_path / "prompts.jsonl"
  rows = [{"messages": [{"role": "user", "content": f"What is {i} + 1?"}], "answer": str(i + 1)}
          for i in range(10)]
  rows.append({"prompt": "long " * 200, "answer": "x"})
  data.write_text("".join(json.dumps(r) + "\n" for r in rows))
  env = {**os.environ, "XLA_FLAGS": helpers.xla_flags(1)}
  base = [sys.executable, "-m", "jaxllm.rl", f"--base={model}", f"--data={data}",
          f"--workdir={tmp_path / 'run'}", "--noprogress", "--config.train.steps=2",
          "--config.train.seq_len=80", "--config.rl.max_new_tokens=8",
          "--config.rl.group_size=2", "--config.rl.prompts_per_step=2",
          "--config.rl.eval_prompts=2", "--config.finetune.eval_fraction=0.2",
          "--config.rl.rewards=exact_match,final_number"]
  bad = subprocess.run(base + ["--config.rl.algorithm=a2c"], capture_output=True, text=True,
                       env=env)
  assert bad.returncode == 2 and "rl.algorithm='a2c' is not one of grpo, ppo" in bad.stderr
  assert "Traceback" not in bad.stderr
  done = subprocess.run(base, capture_output=True, text=True, env=env)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "prompts are longer than" in done.stderr
  summary = json.loads(done.stdout.strip().splitlines()[-1])
  assert summary["command"] == "rl" and summary["step"] == 2
  assert summary["eval_reward_before"] is not None and summary["eval_reward_after"] is not None
  assert os.path.isfile(tmp_path / "run" / "adapter" / "adapter_config.json")
  keys = set().union(*_metrics(str(tmp_path / "run")))
  assert {"reward_mean", "kl", "rollout_tokens_per_s", "entropy", "clip_fraction"} <= keys
