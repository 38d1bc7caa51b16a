"""The RL loop: sample a group of completions per prompt from the policy's current weights
(`jaxllm.rl.rollout`), score them (`jaxllm.rl.rewards`), turn scores into advantages (GRPO's
group normalisation or PPO's GAE over a value head) and update the policy with
`jaxllm.train.step`'s train step on `jaxllm.rl.losses`' objective; then the engine samples
from the updated arrays. Checkpoints, resume, metrics.jsonl and held-out evaluation are those
of fine-tuning (`jaxllm.train.finetune`).

Each step is a pure function of the params, the run's seed and the step number (which prompts,
each completion's sampling seed, the minibatch order), so a run preempted anywhere, mid-rollout
included, resumes from its last checkpoint to the very numbers it would have reached.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxllm import config as config_lib
from jaxllm.checkpoint.orbax import Checkpointer
from jaxllm.data import sft as sft_data_lib
from jaxllm.lora import adapters
from jaxllm.rl import losses, rewards as rewards_lib, rollout
from jaxllm.rl.prompts import Prompts
from jaxllm.train import finetune, metrics as metrics_lib, optim, step as step_lib
from jaxllm.train.loop import PreemptionGuard, TrainingDiverged

TENSORBOARD_DIR = "tb"  # TensorBoard event files in the workdir, beside metrics.jsonl
TRAIN_KEYS = ("inputs", "targets", "positions", "segment_ids", "weights", "old_logps",
              "ref_logps", "advantages", "returns", "old_values")


def reference_of(params: dict) -> Callable[[dict], dict]:
  """`params -> the reference's params` for a policy starting from `params`: with LoRA
  adapters the base itself (each adapter's b at zero, inside the jitted function: no copy
  of the weights); for full training a copy of the starting weights, kept for the run."""
  model_params = losses.policy_params(params)
  if adapters.config_of(model_params) is not None:
    def base(p):
      found = adapters.adapters(losses.policy_params(p))
      return adapters.with_adapters(losses.policy_params(p), {
          path: {"a": ab["a"], "b": jnp.zeros_like(ab["b"])} for path, ab in found.items()})
    return base
  frozen = jax.tree.map(jnp.copy, model_params)
  return lambda _: frozen


def make_analysis(graphdef, reference: Callable[[dict], dict], temperature: float):
  """Jitted `(params, batch) -> {old_logps, ref_logps, values, logps_t1}`: the policy's
  log-probabilities of the sampled tokens at the sampling temperature (what the ratio starts
  from), the reference's, the value head's values (zeros without one) and the policy's at
  temperature 1 (the model's own distribution, what the sampler reports)."""
  def analyse(params, batch):
    logp, _, values, t1 = losses.policy_outputs(graphdef, params, batch, temperature,
                                                also_at=1.0)
    ref, _, _ = losses.policy_outputs(graphdef, reference(params), batch, temperature)
    return {"old_logps": logp, "ref_logps": ref, "logps_t1": t1,
            "values": jnp.zeros_like(logp) if values is None else values}
  return jax.jit(analyse)


def advantages(cfg: config_lib.RlConfig, rewards: np.ndarray, valid: np.ndarray,
               batch: dict, analysis: dict) -> tuple[np.ndarray, np.ndarray, dict]:
  """(advantages `[N, T]`, returns `[N, T]`, metrics) of a scored rollout batch."""
  mask = batch["weights"]
  P, G = cfg.prompts_per_step, cfg.group_size
  r = np.where(valid, rewards, 0.0).astype(np.float32)
  if cfg.algorithm == "grpo":
    adv_PG = np.asarray(losses.group_advantages(jnp.asarray(r.reshape(P, G)),
                                                jnp.asarray(valid.reshape(P, G)),
                                                cfg.scale_rewards))
    groups = valid.reshape(P, G)
    r_PG = r.reshape(P, G)
    flat = np.array([np.ptp(r_PG[p][groups[p]]) == 0 if groups[p].any() else True
                     for p in range(P)])
    adv = adv_PG.reshape(-1)[:, None] * mask
    return adv, np.zeros_like(adv), {"zero_advantage_groups": float(flat.sum())}
  token_rewards = losses.ppo_token_rewards(jnp.asarray(r), jnp.asarray(analysis["old_logps"]),
                                           jnp.asarray(analysis["ref_logps"]),
                                           jnp.asarray(mask), cfg.kl_beta)
  adv, returns = losses.gae(token_rewards, jnp.asarray(analysis["values"]), jnp.asarray(mask),
                            cfg.gamma, cfg.lam)
  return (np.asarray(losses.whiten(adv, jnp.asarray(mask))), np.asarray(returns),
          {"returns_mean": float(np.sum(np.asarray(returns) * mask) / max(mask.sum(), 1.0))})


def _to_checkpoint(state: dict, updates: int) -> dict:
  """The state as saved: numbered by RL step ("step"), its optimizer updates beside it."""
  return {**state, "step": state["step"] // updates, "updates": state["step"]}


def _from_checkpoint(saved: dict) -> dict:
  state = {k: v for k, v in saved.items() if k != "updates"}
  return {**state, "step": saved["updates"]}


def _step_zero_eval(path: str) -> dict:
  with open(path) as f:
    for line in f:
      row = json.loads(line)
      if row.get("step") == 0 and "eval_reward_mean" in row:
        return row
  return {}


def _mean(values: Sequence[dict]) -> dict:
  keys = values[0].keys()
  return {k: float(np.mean([v[k] for v in values])) for k in keys}


def evaluate(sampler: rollout.Sampler, params, prompts: Prompts, scorer, tokenizer,
             max_tokens: int) -> dict:
  """Greedy replies to the held-out prompts, scored: {eval_reward_mean (for 0/1 rewards, the
  accuracy), eval_n}."""
  if not prompts.ids:
    return {}
  comps, _ = sampler.sample(losses.policy_params(params), prompts.ids,
                            [0] * len(prompts.ids), max_tokens=max_tokens, temperature=0.0)
  scored = scorer.score(prompts.records, [tokenizer.decode(c.tokens) for c in comps])
  r = scored.rewards
  return {"eval_reward_mean": float(np.nanmean(r)) if np.isfinite(r).any() else float("nan"),
          "eval_n": len(r)}


def train(graphdef, params: dict, tokenizer, train_prompts: Prompts, eval_prompts: Prompts,
          scorer: rewards_lib.Scorer, workdir: str, experiment: config_lib.FinetuneExperiment,
          *, progress: bool = True, say=None, on_step: Callable[[int], None] | None = None
          ) -> dict[str, Any]:
  """Runs `experiment.rl` on the policy `params` (from `finetune.prepare_params`; PPO: with
  `losses.init_value_head`) in `workdir`, resuming its newest checkpoint. Returns the last
  step's metrics with held-out `eval_reward_mean` before ("eval_before") and after, and
  "params" the trained params (the passed ones are consumed: the step donates them). Metrics
  go to metrics.jsonl and TensorBoard (`tb/`); the starting model's held-out reward is step 0's
  line."""
  say = say or (lambda msg: tqdm.write(msg, file=sys.stderr))
  cfg, train_cfg = experiment.rl, experiment.train
  P, G = cfg.prompts_per_step, cfg.group_size
  N, T = P * G, train_cfg.seq_len
  eos = tokenizer.eos_id
  # Each RL step makes `updates` optimizer updates: the schedule (warmup, decay) is stated in
  # RL steps and runs over updates.
  updates = cfg.epochs * cfg.minibatches
  opt_cfg = dataclasses.replace(train_cfg, steps=train_cfg.steps * updates,
                                warmup_steps=train_cfg.warmup_steps * updates)
  optimizer = optim.make_optimizer(opt_cfg)
  dropout = experiment.lora.dropout if experiment.finetune.method != "full" else 0.0
  train_step = jax.jit(step_lib.make_train_step(graphdef, optimizer, opt_cfg,
                                                objective=losses.objective(cfg),
                                                lora_dropout=dropout), donate_argnums=0)
  analyse = make_analysis(graphdef, reference_of(params), cfg.temperature)
  state = step_lib.init_state(params, optimizer, train_cfg.seed)
  checkpointer = Checkpointer(os.path.join(workdir, finetune.CHECKPOINT_DIR),
                              train_cfg.keep_checkpoints)
  resume_step = checkpointer.latest_step()
  if resume_step is not None:
    say(f"resuming from checkpoint step {resume_step}")
    state = _from_checkpoint(finetune.restore_state(checkpointer, _to_checkpoint(state, updates),
                                                    resume_step))
  sampler = rollout.Sampler(graphdef, losses.policy_params(state["params"]), eos_id=eos,
                            max_seq_len=T + 1, max_slots=cfg.max_slots, mode=cfg.rollout)
  metrics_path = os.path.join(workdir, finetune.METRICS_FILE)
  writer = metrics_lib.MetricsWriter(metrics_path, os.path.join(workdir, TENSORBOARD_DIR),
                                     resume_step=resume_step)
  # Prompts too long for a completion of max_new_tokens in train.seq_len were left out before.
  start = int(state["step"]) // updates
  last: dict[str, Any] = {"step": start}
  saved, stopped_by = resume_step, None
  if start == 0:
    before = evaluate(sampler, state["params"], eval_prompts, scorer, tokenizer,
                      cfg.max_new_tokens)
    if before:
      writer.write({"step": 0, **before})
      say(f"held-out reward before (greedy, {before['eval_n']} prompts): "
          f"{before['eval_reward_mean']:.3f}")
  else:  # the starting model's, as the interrupted run measured it
    before = _step_zero_eval(metrics_path)
  indices = list(range(len(train_prompts.ids)))
  bar = tqdm(total=train_cfg.steps, initial=start, disable=not progress,
             desc=f"{experiment.name} ({cfg.algorithm})", unit="step", dynamic_ncols=True)
  began = time.perf_counter()
  try:
    with PreemptionGuard() as guard:
      for step in range(start + 1, train_cfg.steps + 1):
        picked = sft_data_lib.batch_at(indices, step - 1, P, train_cfg.seed, make=list)
        prompts = [train_prompts.ids[i] for i in picked for _ in range(G)]
        records = [train_prompts.records[i] for i in picked for _ in range(G)]
        seeds = [rollout.sample_seed(train_cfg.seed, step, j) for j in range(N)]
        comps, roll = sampler.sample(losses.policy_params(state["params"]), prompts, seeds,
                                     max_tokens=cfg.max_new_tokens,
                                     temperature=cfg.temperature, top_p=cfg.top_p)
        t_score = time.perf_counter()
        scored = scorer.score(records, [tokenizer.decode(c.tokens) for c in comps])
        score_s = time.perf_counter() - t_score
        valid = np.isfinite(scored.rewards)
        t_update = time.perf_counter()
        batch = rollout.rows(comps, T, eos, keep=valid)
        device_batch = {k: jnp.asarray(v) for k, v in batch.items()
                        if k in ("inputs", "targets", "positions", "segment_ids")}
        analysis = jax.device_get(analyse(state["params"], device_batch))
        adv, returns, adv_metrics = advantages(cfg, scored.rewards, valid, batch, analysis)
        full = {**{k: batch[k] for k in ("inputs", "targets", "positions", "segment_ids",
                                         "weights")},
                "old_logps": analysis["old_logps"], "ref_logps": analysis["ref_logps"],
                "advantages": adv.astype(np.float32), "returns": returns.astype(np.float32),
                "old_values": analysis["values"]}
        step_metrics = []
        for epoch in range(cfg.epochs):
          order = np.random.default_rng([train_cfg.seed, step, epoch]).permutation(N)
          for part in np.split(order, cfg.minibatches):
            mb = {k: jnp.asarray(full[k][part]) for k in TRAIN_KEYS}
            state, m = train_step(state, mb)
            step_metrics.append({k: v for k, v in m.items() if np.ndim(v) == 0})
        step_metrics = _mean(jax.device_get(step_metrics))
        update_s = time.perf_counter() - t_update
        if not (math.isfinite(step_metrics["loss"])
                and math.isfinite(step_metrics["grad_norm"])):
          raise TrainingDiverged(f"non-finite loss {step_metrics['loss']} / grad norm "
                                 f"{step_metrics['grad_norm']} at step {step}; last good "
                                 f"checkpoint: step {saved} (kept)")
        sm = batch["sampled_mask"]
        gap = np.abs(batch["sampled_logps"] - analysis["logps_t1"]) * sm
        # KL(sampling policy || reference) on this rollout's tokens (k3, per token), before
        # the update: exactly 0 at the first step; `kl` is the same during the update steps.
        d = (analysis["ref_logps"] - analysis["old_logps"]) * batch["weights"]
        rollout_kl = float(np.sum(np.exp(d) - d - 1.0) / max(batch["weights"].sum(), 1.0))
        good = scored.rewards[valid]
        lengths = np.array([len(c.tokens) for c in comps])
        train_tokens = float(batch["weights"].sum()) * cfg.epochs
        last = {"step": step, **step_metrics, **adv_metrics,
                "reward_mean": float(good.mean()) if good.size else float("nan"),
                "reward_std": float(good.std()) if good.size else float("nan"),
                **{f"reward_{k}": float(np.nanmean(v)) if np.isfinite(v).any()
                   else float("nan") for k, v in scored.parts.items()},
                "skipped_completions": int((~valid).sum()),
                **{f"reward_{k}_failures": v for k, v in scored.failures.items()},
                "rollout_kl": rollout_kl, "response_length": float(lengths.mean()),
                "stopped_fraction": float(np.mean([c.stopped for c in comps])),
                "logprob_mismatch_max": float(gap.max()),
                "logprob_mismatch_mean": float(gap.sum() / max(sm.sum(), 1.0)),
                "rollout_tokens": roll["tokens"], "rollout_s": roll["seconds"],
                "rollout_tokens_per_s": roll["tokens"] / max(roll["seconds"], 1e-9),
                "prefix_pages_reused": roll["prefix_pages"],
                "score_s": score_s, "update_s": update_s,
                "train_tokens_per_s": train_tokens / max(update_s, 1e-9),
                "elapsed_s": time.perf_counter() - began}
        final = step == train_cfg.steps
        due_ckpt = (step % train_cfg.checkpoint_every == 0 or final
                    or guard.signum is not None)
        writer.write(last)
        bar.set_postfix(reward=f"{last['reward_mean']:.3f}", kl=f"{last['kl']:.4f}")
        if eval_prompts.ids and (step % train_cfg.eval_every == 0 or final):
          ev = evaluate(sampler, state["params"], eval_prompts, scorer, tokenizer,
                        cfg.max_new_tokens)
          writer.write({"step": step, **ev})
          last.update(ev)
          say(f"step {step}: held-out reward {ev['eval_reward_mean']:.3f}")
        if due_ckpt:
          saved = checkpointer.save(finetune.checkpoint_state(_to_checkpoint(state, updates)))
        bar.update(1)
        if on_step is not None:
          on_step(step)
        if guard.signum is not None:
          stopped_by = guard.signum
          break
  finally:
    bar.close()
    writer.close()
    checkpointer.close()
  last.update(checkpoint_step=saved, preempted_by=stopped_by, params=state["params"],
              eval_before=before.get("eval_reward_mean"))
  return last
