"""Fine-tuning (`jaxllm.train.trainable`, `jaxllm.train.finetune`, `python -m jaxllm.sft`)
against references built here: a LoRA train step moves each adapter by its gradient taken
through the merged weight (SGD, so the update is the gradient), in one batch or accumulated,
and leaves every base weight bitwise; QLoRA keeps its int4 base bytes and holds optimizer state
for the adapters alone (bytes counted); a stopped run resumes to the same adapters as an
unbroken one; LoRA on an 8-device mesh trains as on one device; the command fails bad input in
one line before compiling."""

import json
import os
import subprocess
import sys

import chex
import numpy as np
import optax
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm import config as config_lib
from jaxllm.data import sft as sft_data
from jaxllm.lora import adapters
from jaxllm.lora.weight import LoraWeight
from jaxllm.model import transformer
from jaxllm.quant import params as qparams
from jaxllm.quant import tensor as qtensor
from jaxllm.train import finetune
from jaxllm.train import step as step_lib
from jaxllm.train import trainable
from tests.helpers import CharTokenizer, lora_with_updates, tiny_model, xla_flags


def _records(n, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    a, b = (int(x) for x in rng.integers(0, 99, 2))
    out.append((i + 1, {"prompt": f"{a}+{b}=", "completion": str(a + b)}))
  return out


def _batch(seq_len=24, rows=4):
  examples = [sft_data.tokenize(r, CharTokenizer()) for _, r in _records(10)]
  packed, _ = sft_data.pack(examples, seq_len)
  return jax.tree.map(jnp.asarray, sft_data.to_batch(packed[:rows]))


def _reference_loss(graphdef, params, ab, batch):
  """Mean NLL over the learned targets, through the merged weights base + scale * a @ b."""
  merged = adapters.merge(adapters.with_adapters(params, ab))
  logits, _ = nnx.merge(graphdef, merged).forward(batch["inputs"], batch["positions"],
                                                  batch["segment_ids"])
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  picked = jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
  return -jnp.sum(picked * batch["weights"]) / jnp.sum(batch["weights"])


def _frozen_leaves(params):
  """Every array of `params` but the adapters' a and b, by path."""
  out = {}
  for path, w in qparams.flatten(params).items():
    base = w.base if isinstance(w, LoraWeight) else w
    leaves = jax.tree_util.tree_leaves_with_path(base)
    for sub, leaf in leaves:
      out[path + jax.tree_util.keystr(sub)] = np.asarray(leaf)
  return out


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_lora_step_moves_adapters_by_their_merged_weight_gradient(grad_accum):
  cfg = tiny_model(init_std=0.3)
  graphdef, params = transformer.split(transformer.create(cfg, 0))
  lora = lora_with_updates(params, adapters.LoraConfig(rank=4, targets=("q", "v", "o", "down")))
  batch = _batch()
  lr = 0.5
  opt = optax.sgd(lr)
  train_cfg = config_lib.TrainConfig(grad_accum=grad_accum)
  state = step_lib.init_state(lora, opt, seed=0)
  new, metrics = jax.jit(step_lib.make_train_step(graphdef, opt, train_cfg))(state, batch)
  ab = adapters.adapters(lora)
  grads = jax.grad(lambda t: _reference_loss(graphdef, lora, t, batch))(ab)
  moved = jax.tree.map(lambda x, y: (x - y) / lr, ab, adapters.adapters(new["params"]))
  # rtol: accumulated microbatch gradients are float32 sums in another order (9e-5 apart on an
  # AMD EPYC with AVX-512, 2026-12-07); a wrong gradient (a missing scale) is off by O(1)
  chex.assert_trees_all_close(moved, grads, atol=1e-5, rtol=5e-4)
  np.testing.assert_allclose(float(metrics["loss"]),
                             float(_reference_loss(graphdef, lora, ab, batch)), rtol=1e-5)
  before, after = _frozen_leaves(lora), _frozen_leaves(new["params"])
  assert before.keys() == after.keys() and len(before) > 8
  for key in before:
    np.testing.assert_array_equal(after[key], before[key], err_msg=key)


def test_lora_dropout_step_drops_with_the_states_key():
  """`lora.dropout`: the step's adapter update is the gradient of the loss with the adapters'
  inputs masked by `adapters.with_dropout` under the state's key, not the undropped one."""
  cfg = tiny_model(init_std=0.3)
  graphdef, params = transformer.split(transformer.create(cfg, 0))
  lora = lora_with_updates(params, adapters.LoraConfig(rank=4, targets=("q", "v", "down")))
  batch, lr = _batch(), 0.5
  opt = optax.sgd(lr)
  state = step_lib.init_state(lora, opt, seed=3)
  new, _ = jax.jit(step_lib.make_train_step(graphdef, opt, config_lib.TrainConfig(),
                                            lora_dropout=0.5))(state, batch)
  ab = adapters.adapters(lora)

  def dropped_loss(t):
    p = adapters.with_dropout(adapters.with_adapters(lora, t), state["rng"], 0.5)
    logits, _ = nnx.merge(graphdef, p).forward(batch["inputs"], batch["positions"],
                                               batch["segment_ids"])
    picked = jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None],
                                 -1)[..., 0]
    return -jnp.sum(picked * batch["weights"]) / jnp.sum(batch["weights"])

  moved = jax.tree.map(lambda x, y: (x - y) / lr, ab, adapters.adapters(new["params"]))
  chex.assert_trees_all_close(moved, jax.grad(dropped_loss)(ab), atol=1e-5)
  plain = jax.grad(lambda t: _reference_loss(graphdef, lora, t, batch))(ab)
  assert not np.allclose(moved["blocks/attn/q"]["a"], plain["blocks/attn/q"]["a"], atol=1e-4)


def test_full_training_view_is_the_identity():
  _, params = transformer.split(transformer.create(tiny_model(), 0))
  part, frozen = trainable.split(params)
  assert part is params and frozen is None and trainable.combine(part, None) is params


def _experiment(steps, method="qlora"):
  return config_lib.finetune_from_config_dict({
      "name": "t", "finetune": {"method": method, "eval_fraction": 0.0},
      "lora": {"rank": 4, "targets": ("q", "k", "up"), "base_group_size": 16},
      "train": {"steps": steps, "batch_size": 4, "seq_len": 24, "lr": 3e-2, "warmup_steps": 1,
                "log_every": 1, "eval_every": 100, "checkpoint_every": 2,
                "weight_decay": 0.0}})


def _fit(workdir, params, graphdef, steps, method="qlora", mesh=None):
  experiment = _experiment(steps, method)
  records = _records(16)
  data = finetune.sft_data(*[finetune.sft_examples(r, CharTokenizer(), "assistant")
                             for r in (records[:-4], records[-4:])], experiment, lambda _: None)
  params = jax.tree.map(jnp.copy, params)  # fit donates what it is given
  return finetune.fit(graphdef, params, step_lib.lm_objective(experiment.train), data,
                      str(workdir), experiment, progress=False, say=lambda _: None, mesh=mesh)


def _losses(workdir):
  return [r["loss"] for r in map(json.loads, open(workdir / finetune.METRICS_FILE))
          if "loss" in r]


def test_qlora_fit_keeps_int4_base_holds_adapter_state_only_and_resumes(tmp_path):
  cfg = tiny_model(init_std=0.3)
  graphdef, params = transformer.split(transformer.create(cfg, 0))
  start = finetune.prepare_params(params, _experiment(4), seed=0)
  flat = qparams.flatten(start)
  assert qtensor.is_qtensor(flat["blocks/attn/q"].base) and flat["blocks/attn/q"].base.bits == 4
  assert qtensor.is_qtensor(flat["blocks/attn/v"])  # quantized, not adapted

  # Optimizer state: AdamW's two moments of the adapters, nothing of the base.
  from jaxllm.train import optim
  state = step_lib.init_state(start, optim.make_optimizer(config_lib.TrainConfig()), 0)
  adapter_bytes = sum(x.nbytes for x in jax.tree.leaves(adapters.adapters(start)))
  moment_bytes = sum(x.nbytes for x in jax.tree.leaves(state["opt_state"]) if x.ndim)
  assert moment_bytes == 2 * adapter_bytes

  whole = _fit(tmp_path / "whole", start, graphdef, steps=4)
  _fit(tmp_path / "split", start, graphdef, steps=2)
  resumed = _fit(tmp_path / "split", start, graphdef, steps=4)
  assert resumed["step"] == 4 and resumed["checkpoint_step"] == 4
  chex.assert_trees_all_close(adapters.adapters(resumed["params"]),
                              adapters.adapters(whole["params"]), atol=1e-6)
  trained = adapters.adapters(whole["params"])
  assert all(float(jnp.abs(ab["b"]).max()) > 0 for ab in trained.values())
  before, after = _frozen_leaves(start), _frozen_leaves(whole["params"])
  assert before.keys() == after.keys()
  for key in before:  # the packed int4 bytes and their scales, bitwise
    np.testing.assert_array_equal(after[key], before[key], err_msg=key)
  losses = _losses(tmp_path / "whole")
  assert losses[-1] < losses[0]


def test_lora_on_a_data_fsdp_tensor_mesh_trains_as_on_one_device(tmp_path):
  """LoRA fine-tuning split over data=2 x fsdp=2 x tensor=2 (8 devices: the base, adapters and
  moments by the logical-axis rules, rows over data and fsdp) gives one device's losses and
  adapters within 1e-5."""
  from jaxllm.parallel import placement
  graphdef, params = transformer.split(transformer.create(tiny_model(init_std=0.3), 0))
  start = finetune.prepare_params(params, _experiment(3, "lora"), seed=0)
  one = _fit(tmp_path / "one", start, graphdef, steps=3, method="lora")
  mesh = placement.parse_mesh("data=2,fsdp=2,tensor=2")
  eight = _fit(tmp_path / "eight", start, graphdef, steps=3, method="lora", mesh=mesh)
  np.testing.assert_allclose(_losses(tmp_path / "eight"), _losses(tmp_path / "one"), rtol=1e-5)
  want = adapters.adapters(jax.device_get(one["params"]))
  got = adapters.adapters(eight["params"])
  for path, ab in got.items():
    for name, x in ab.items():
      rel = np.linalg.norm(np.asarray(x) - want[path][name]) / np.linalg.norm(want[path][name])
      assert rel <= 1e-5, (path, name, rel)
  # really split: q's a [L, D, r] over fsdp along D, its b [L, r, H, Dh] over tensor along H
  q = qparams.flatten(eight["params"])["blocks/attn/q"]
  assert q.a.sharding.spec[1] == "fsdp" and q.b.sharding.spec[2] == "tensor"


def _run(*args):
  return subprocess.run([sys.executable, "-m", "jaxllm.sft", "--noprogress", *args],
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, "XLA_FLAGS": xla_flags(devices=1)})


def test_command_refuses_bad_input_in_one_line_before_compiling(tmp_path, tiny_chat_model):
  """(The documented `jaxllm sft` and `jaxllm dpo` runs, their adapters loaded by generate, run
  end to end in tests/test_readme_snippets.py.)"""
  from jaxllm.data import instructions
  data = tmp_path / "chats.jsonl"
  instructions.write_jsonl(instructions.chats(24, seed=1), str(data))
  no_reply = tmp_path / "no_reply.jsonl"
  no_reply.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
  for args, message in (
      ([f"--data={no_reply}"], f"error: {no_reply}:1: no assistant turn to learn from"),
      ([f"--data={data}", "--config.lora.rank=97"],
       "error: lora rank=97 is larger than blocks/attn/q's dimensions (96,) -> (6, 16) "
       "(at most 96)")):
    bad = _run(f"--base={tiny_chat_model}", f"--workdir={tmp_path / 'bad'}", *args)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == message, bad.stderr
    assert not (tmp_path / "bad").exists()
