"""`python -m jaxllm.rl`'s run: the experiment and the records checked before any compilation,
the policy (LoRA adapters, QLoRA's, or every weight; PPO adds a value head), the rewards, the
loop (`jaxllm.rl.loop`), and the policy written whole (`adapter/` in PEFT's format or
`model/`)."""

from __future__ import annotations

import dataclasses
import sys

from jaxllm.cli import common
from jaxllm.cli import finetune as finetune_cli


def run(holder, base_path: str, data_path: str, workdir: str | None, progress: bool,
        mesh: str | None = None) -> None:
  exp = finetune_cli.experiment(holder)  # validated before any JAX work
  cfg, train_cfg = exp.rl, exp.train
  workdir = workdir or f"runs/{exp.name}"
  if mesh:
    raise common.CommandError("jaxllm rl runs on one device (its rollouts and updates share "
                              "it); --mesh is not supported yet")
  rows = cfg.prompts_per_step * cfg.group_size // cfg.minibatches
  if rows % train_cfg.grad_accum:
    raise common.CommandError(f"train.grad_accum={train_cfg.grad_accum} does not divide the "
                              f"{rows} completions of a minibatch")
  from jaxllm.data import sft as sft_data
  from jaxllm.rl import loop, losses, rewards
  from jaxllm.rl import prompts as prompts_lib
  from jaxllm.train import finetune
  wanted = finetune.settings("rl", base_path, data_path, exp)
  finetune.check_workdir(workdir, wanted)
  records = sft_data.read_jsonl(data_path, prompts_lib.check_record)
  try:
    rewards.check_records(records, cfg.rewards, data_path)
    scorer_args = dict(names=cfg.rewards, weights=cfg.reward_weights,
                       timeout_s=cfg.reward_timeout_s, model_weight=cfg.reward_model_weight)
    rewards.Scorer(**scorer_args)  # unknown module:function rewards fail here
  except ValueError as e:
    raise common.CommandError(str(e)) from None
  train_records, eval_records = sft_data.split_examples(records, exp.finetune.eval_fraction,
                                                        train_cfg.seed)
  eval_records = eval_records[:cfg.eval_prompts]
  finetune.lora_config(exp.lora)  # bad targets fail before the model loads

  import jaxllm
  from jaxllm.model import transformer
  base = jaxllm.load(base_path)
  if train_cfg.seq_len + 1 > base.config.max_seq_len:
    raise common.CommandError(f"train.seq_len={train_cfg.seq_len} exceeds the model's "
                              f"max_seq_len={base.config.max_seq_len} - 1")
  if "messages" in records[0][1] and not base.tokenizer.chat_template:
    raise common.CommandError(f"{base_path} has no chat template for \"messages\" records: "
                              "give \"prompt\" text instead")
  say = lambda msg: print(msg, file=sys.stderr)
  # A prompt needs room for max_new_tokens after it: longer ones are left out, counted.
  limit = train_cfg.seq_len - cfg.max_new_tokens
  parts = []
  for name, recs in (("train", train_records), ("held-out", eval_records)):
    fit, longer = prompts_lib.fitting([r for _, r in recs], base, limit)
    if longer:
      say(f"data: {longer} of {len(recs)} {name} prompts are longer than train.seq_len - "
          f"rl.max_new_tokens = {limit} tokens: left out")
    parts.append(fit)
  train_prompts, eval_prompts = parts
  if not train_prompts.ids:
    raise common.CommandError(f"no train prompt fits train.seq_len={train_cfg.seq_len} with "
                              f"rl.max_new_tokens={cfg.max_new_tokens}")
  say(f"data: {len(train_prompts.ids)} train / {len(eval_prompts.ids)} held-out prompts; "
      f"{cfg.prompts_per_step} x {cfg.group_size} completions per step")
  reward_model = None
  if cfg.reward_model:
    try:
      reward_model = rewards.load_reward_model(cfg.reward_model, train_cfg.seq_len)
    except ValueError as e:
      raise common.CommandError(str(e)) from None
  scorer = rewards.Scorer(**scorer_args, model=reward_model)
  params = finetune.prepare_params(base.params, exp, train_cfg.seed)
  if cfg.algorithm == "ppo":
    params = losses.init_value_head(params, base.config.d_model)
  run_config = finetune.model_config(base.config, exp)
  graphdef = transformer.abstract_params(run_config)[0]
  finetune.write_settings(workdir, wanted)
  result = loop.train(graphdef, params, base.tokenizer, train_prompts, eval_prompts, scorer,
                      workdir, exp, progress=progress, say=say)
  policy = losses.policy_params(result.pop("params"))
  if result["preempted_by"] is not None:
    common.finish_training(result, workdir)
  # Written with the base's own config: finetune.remat / compute_dtype were this run's.
  out = finetune_cli.write_result(workdir, exp.finetune.method,
                                  dataclasses.replace(base, params=policy), base_path)
  print(f"wrote {out}", file=sys.stderr)
  before = result.pop("eval_before")
  common.finish_training({**result, "command": "rl", "algorithm": cfg.algorithm,
                          "method": exp.finetune.method, "out": out,
                          "eval_reward_before": before,
                          "eval_reward_after": result.get("eval_reward_mean")}, workdir)
