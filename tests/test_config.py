"""Config validation: clear one-line errors naming the key, before any compilation."""

import os
import subprocess
import sys

import pytest

from jaxllm import config as config_lib
from tests.helpers import REPO, tiny_experiment



def test_default_experiment_is_valid():
  sys.path.insert(0, REPO)
  from experiments import tiny
  cfg = config_lib.from_config_dict(tiny.get_config())
  assert cfg.name == "tiny"
  assert cfg.model.n_heads % cfg.model.n_kv_heads == 0
  assert config_lib.validate_for_devices(cfg, 1)["data"] == 1


@pytest.mark.parametrize("section, values, fragment", [
    ("model", dict(n_heads=6, n_kv_heads=4), "model.n_heads=6 is not a multiple of model.n_kv_heads=4"),
    ("model", dict(dtype="int4"), "model.dtype='int4'"),
    ("model", dict(head_dim=7), "model.head_dim=7 must be even"),
    ("model", dict(d_model=0), "model.d_model=0 must be positive"),
    ("model", dict(remat="sometimes"), "model.remat='sometimes'"),
    ("model", dict(position_encoding="nope"), "model.position_encoding='nope' is not one of"),
    ("model", dict(position_encoding="alibi", rope_scaling="yarn", rope_scaling_factor=2.0),
     "model.rope_scaling='yarn' scales RoPE, which model.position_encoding=alibi does not use"),
    ("model", dict(rope_scaling="yarn", rope_scaling_factor=2.0, rope_yarn_beta_slow=40.0),
     "model.rope_yarn_beta_slow must be positive and below model.rope_yarn_beta_fast"),
    ("model", dict(rope_scaling="ntk", rope_scaling_factor=0.0),
     "model.rope_scaling_factor=0.0 must be positive"),
    ("model", dict(norm_placement="middle"), "model.norm_placement='middle' is not one of"),
    ("model", dict(qk_norm_over_heads=True), "model.qk_norm_over_heads=True needs model.qk_norm"),
    ("model", dict(mlp_activation="relu"), "model.mlp_activation='relu' is not one of"),
    ("model", dict(global_every=2), "model.global_every=2 needs model.sliding_window > 0"),
    ("model", dict(rope_local_theta=1e4), "model.rope_local_theta=10000.0 needs "
     "model.global_every > 0"),
    ("model", dict(query_pre_attn_scalar=2.5), "model.query_pre_attn_scalar=2.5 must be a whole"),
    ("model", dict(attn_logit_soft_cap=-1.0), "model.attn_logit_soft_cap must be >= 0"),
    ("train", dict(seq_len=4096), "train.seq_len=4096 exceeds model.max_seq_len"),
    ("train", dict(batch_size=8, grad_accum=3), "train.batch_size=8 is not divisible by train.grad_accum=3"),
    ("train", dict(steps="many"), "train.steps='many' must be an integer"),
    ("train", dict(stepz=3), "unknown config key train.stepz"),
    ("mesh", dict(data=-1, fsdp=-1), "at most one mesh axis may be -1"),
    ("mesh", dict(context=3), "is not divisible by mesh.context=3"),
    ("mesh", dict(context=0), "mesh.context=0 must be a positive device count"),
    ("data", dict(eval_fraction=1.5), "data.eval_fraction=1.5"),
    ("data", dict(mixture="code:1"), "data.mixture weighs named sources: set data.sources"),
    ("data", dict(sources="code=a,docs=b", mixture="code:0.7,web:0.3"),
     "no weight for docs; no source named web"),
    ("data", dict(sources="code=a", mixture="code:-1"), "data.mixture entry 'code:-1' is not"),
    ("data", dict(sources="code"), "data.sources entry 'code' is not name=path_or_glob"),
    ("data", dict(sources="code=a", paths="b"), "data.paths and data.sources are exclusive"),
    ("data", dict(packing="tight"), "data.packing='tight' is not one of concat, best_fit"),
    ("data", dict(order="random"), "data.order='random' is not one of shuffle, difficulty"),
    ("train", dict(seq_len_schedule="8:10,16"), "entry '16' is not length:until_step"),
    ("train", dict(seq_len_schedule="12:10"), "length 12 does not divide train.seq_len=32"),
    ("train", dict(seq_len_schedule="16:10,8:20"), "lengths and steps must increase"),
    ("mesh", dict(zero_stage=3), "mesh.zero_stage=3 is not one of 0, 1, 2 (ZeRO stage 3"),
    ("model", dict(remat_every=2), "model.remat_every=2 must be >= 1; above 1 it needs a "
     "model.remat policy"),
    ("model", dict(remat="full", remat_every=3), "model.n_layers divisible by it"),
    ("train", dict(pipeline_schedule="zero_bubble"), "train.pipeline_schedule='zero_bubble'"),
    ("train", dict(pipeline_schedule="1f1b", pipeline_chunks=2),
     "the circular schedule, and only it, runs pipeline_chunks > 1"),
    ("train", dict(pipeline_schedule="circular"), "train.pipeline_schedule=circular with train."
     "pipeline_chunks=1"),
    ("train", dict(loss_scaling="static"), "train.loss_scaling='static' is not one of"),
    ("train", dict(loss_scale_init=0.5), "train.loss_scale_init=0.5 must be >= 1"),
    ("train", dict(profile_steps="5"), "train.profile_steps='5' is not START,COUNT"),
    ("train", dict(profile_steps="0,2"), "START and COUNT must be >= 1"),
    ("train", dict(spike_grad_factor=0.5), "train.spike_grad_factor=0.5 must be 0 (off) or "
     "above 1"),
    ("train", dict(skip_steps="3,x"), "train.skip_steps='3,x' is not comma-separated step"),
    ("train", dict(checkpoint_minutes=-1.0), "train.checkpoint_minutes, train.watchdog_s, "
     "train.rollback_limit and train.straggler_factor must be >= 0"),
    ("train", dict(profile_steps="30,2"), "starts after the last step (train.steps=20)"),
])
def test_invalid_values_name_the_key(section, values, fragment):
  with pytest.raises(config_lib.ConfigError, match=None) as info:
    tiny_experiment(**{section: values})
  assert fragment in str(info.value)
  assert "\n" not in str(info.value)


def test_unknown_section():
  with pytest.raises(config_lib.ConfigError, match="unknown config section 'trian'"):
    config_lib.from_config_dict({"trian": {}})


def test_batch_must_divide_over_devices():
  cfg = tiny_experiment(train=dict(batch_size=6), mesh=dict(data=4))
  with pytest.raises(config_lib.ConfigError, match="not divisible by the 4 batch shards"):
    config_lib.validate_for_devices(cfg, 4)
  with pytest.raises(config_lib.ConfigError, match="needs a multiple of 4 devices, but 6 are "
                     "available"):
    config_lib.validate_for_devices(tiny_experiment(mesh=dict(data=4)), 6)
  with pytest.raises(config_lib.ConfigError, match="needs a multiple of 2 devices, but 1 is "
                     "available"):
    config_lib.validate_for_devices(tiny_experiment(mesh=dict(data=2)), 1)


def test_pipeline_and_kernel_choices_are_checked_before_compiling():
  with pytest.raises(config_lib.ConfigError, match="n_layers=2 must be divisible by the "
                     "mesh.stage=4"):
    config_lib.validate_for_devices(tiny_experiment(mesh=dict(data=1, stage=4)), 4)
  with pytest.raises(config_lib.ConfigError, match="not divisible by train.microbatches=3"):
    config_lib.validate_for_devices(
        tiny_experiment(mesh=dict(data=1, stage=2), train=dict(microbatches=3)), 2)
  with pytest.raises(config_lib.ConfigError, match="mesh.expert=2 needs an MoE model"):
    config_lib.validate_for_devices(tiny_experiment(mesh=dict(data=1, expert=2)), 2)
  with pytest.raises(config_lib.ConfigError, match="model.remat_every=2 selects layers of an "
                     "unpipelined model"):
    config_lib.validate_for_devices(tiny_experiment(model=dict(remat="full", remat_every=2),
                                                    mesh=dict(data=1, stage=2)), 2)
  with pytest.raises(config_lib.ConfigError, match="1f1b does not scale its loss"):
    tiny_experiment(model=dict(dtype="float16"), train=dict(pipeline_schedule="1f1b"))
  with pytest.raises(config_lib.ConfigError, match="1f1b runs dense models"):
    tiny_experiment(model=dict(n_experts=4, experts_per_token=2),
                    train=dict(pipeline_schedule="1f1b"))
  for cfg in (tiny_experiment(train=dict(offload_optimizer=True)),
              tiny_experiment(model=dict(remat="offload_dots"))):
    with pytest.raises(config_lib.ConfigError, match="needs a GPU or TPU .this machine runs cpu"):
      config_lib.validate_for_devices(cfg, 8, "cpu")
    assert config_lib.validate_for_devices(cfg, 8, "gpu")
  with pytest.raises(config_lib.ConfigError, match="cudnn needs a GPU"):
    config_lib.validate_for_devices(tiny_experiment(model=dict(attention_impl="cudnn")), 8,
                                    "cpu")
  with pytest.raises(config_lib.ConfigError, match="head_dim in 64/128/256"):
    tiny_experiment(model=dict(attention_impl="pallas"))


def test_round_trips_through_dict():
  cfg = tiny_experiment()
  assert config_lib.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("args, fragment", [
    (["--config.model.n_kv_heads=3"], "model.n_heads=4 is not a multiple of model.n_kv_heads=3"),
    (["--config.train.nope=1"], "unknown config key 'nope'"),
    (["--config.train.steps=abc"], "--config.train.steps=abc"),
    (["--config=experiments/missing.py"], "cannot load experiment file 'experiments/missing.py'"),
])
def test_cli_rejects_bad_config_in_one_line(args, fragment, tmp_path):
  proc = subprocess.run([sys.executable, "-m", "jaxllm.train", f"--workdir={tmp_path}/w", *args],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1, proc.stderr
  assert fragment in lines[0] and "Traceback" not in proc.stderr
  assert not os.path.exists(tmp_path / "w"), "nothing is written for an invalid config"


def test_moe_keys_are_checked_before_compiling():
  bad = [(dict(n_experts=4, experts_per_token=5), "experts_per_token=5 must be in"),
         (dict(n_experts=4, router="topk"), "model.router='topk'"),
         (dict(n_experts=4, moe_every=3), "leave no MoE layer"),
         (dict(n_experts=4, shared_expert_gate=True), "needs model.n_shared_experts"),
         (dict(n_experts=4, capacity_factor=-1.0), "capacity_factor"),
         (dict(moe_impl="cuda"), "model.moe_impl='cuda'")]
  for model, match in bad:
    with pytest.raises(config_lib.ConfigError, match=match):
      tiny_experiment(model=model)
  moe = dict(n_experts=6)
  with pytest.raises(config_lib.ConfigError, match="n_experts=6 is not divisible by "
                     "mesh.expert=4"):
    config_lib.validate_for_devices(tiny_experiment(model=moe, mesh=dict(data=1, expert=4)), 4)
  with pytest.raises(config_lib.ConfigError, match="mesh.data x mesh.fsdp x mesh.expert"):
    config_lib.validate_for_devices(
        tiny_experiment(model=moe, train=dict(batch_size=4), mesh=dict(data=1, expert=3,
                                                                       fsdp=2)), 6)
  with pytest.raises(config_lib.ConfigError, match="first_dense_layers=0"):
    config_lib.validate_for_devices(
        tiny_experiment(model=dict(moe, first_dense_layers=1), mesh=dict(data=1, stage=2)), 2)


def test_show_config_prints_every_key_with_its_value_and_meaning(tmp_path):
  import dataclasses

  from jaxllm.cli import show_config
  proc = subprocess.run([sys.executable, "-m", "jaxllm.train", f"--workdir={tmp_path}/w",
                         "--show_config", "--config.train.steps=7"],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert not os.path.exists(tmp_path / "w")  # nothing trained, nothing written
  lines = proc.stdout.splitlines()
  cfg = config_lib.Config("x", config_lib.ModelConfig(), config_lib.DataConfig(),
                          config_lib.TrainConfig(), config_lib.MeshConfig())
  keys = [f"{s}.{k}" for s, section in cfg.to_dict().items() if isinstance(section, dict)
          for k in section]
  assert sorted(l.split(" = ")[0] for l in lines if l and not l.startswith("#")) == sorted(keys)
  assert "train.steps = 7" in lines
  assert lines[lines.index("train.lr = 0.003") - 1].startswith("# peak learning rate")
  # Every field has a comment of its own or sits in a commented group, so none is unexplained.
  sections = [type(getattr(cfg, s)) for s in ("model", "data", "train", "mesh", "distill")]
  sections += [config_lib.FinetuneConfig, config_lib.AdapterConfig, config_lib.PreferenceConfig,
               config_lib.RlConfig]
  for cls in sections:
    assert set(show_config.field_notes(cls)) == {f.name for f in dataclasses.fields(cls)}, cls

  @dataclasses.dataclass
  class Planted:
    # the first, with its meaning
    a: int = 0
    b: int = 1  # inline

    c: int = 2
  assert show_config.field_notes(Planted) == {"a": "the first, with its meaning", "b": "inline"}
