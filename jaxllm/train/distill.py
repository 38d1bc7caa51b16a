"""Knowledge distillation's pieces beside the training loop: the teacher it carries, the checks
that a student fits it, and a student initialised from a subset of the teacher's layers.

The loss is `losses.distillation_sum`; the teacher runs inside the jitted train step
(`step.make_train_step(..., teacher=...)`), so nothing is cached between steps.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from jaxllm import config as config_lib
from jaxllm.model import transformer


class Teacher(NamedTuple):
  config: config_lib.ModelConfig
  graphdef: Any
  params: Any
  tokenizer: Any


def check(cfg: config_lib.Config, teacher: Teacher) -> None:
  """Raises ConfigError (one line) when the student cannot learn from this teacher."""
  if cfg.model.vocab_size != teacher.config.vocab_size:
    raise config_lib.ConfigError(
        f"model.vocab_size={cfg.model.vocab_size} must equal the teacher's "
        f"{teacher.config.vocab_size}: the student predicts over the teacher's vocabulary")
  if cfg.mesh.stage > 1 or cfg.mesh.context > 1:
    raise config_lib.ConfigError("distillation runs the teacher unpipelined on whole "
                                 "sequences: use mesh.stage=1 and mesh.context=1")
  if cfg.distill.top_k > teacher.config.vocab_size:
    raise config_lib.ConfigError(f"distill.top_k={cfg.distill.top_k} exceeds the teacher's "
                                 f"vocabulary of {teacher.config.vocab_size}")
  layers = config_lib.parse_layers(cfg.distill.init_layers)
  if layers and teacher.config.n_experts:
    raise config_lib.ConfigError("distill.init_layers copies dense teacher layers; an MoE "
                                 "teacher's student starts from a random init")
  if layers:
    bad = [i for i in layers if not 0 <= i < teacher.config.n_layers]
    if bad:
      raise config_lib.ConfigError(f"distill.init_layers {bad} are not layers of the "
                                   f"{teacher.config.n_layers}-layer teacher")
    same = ("d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff", "tie_embeddings",
            "n_experts", "qkv_bias", "qk_norm", "norm_placement", "mlp_activation")
    differ = [k for k in same if getattr(cfg.model, k) != getattr(teacher.config, k)]
    if differ:
      raise config_lib.ConfigError(
          "distill.init_layers copies teacher layers, so the student's "
          + ", ".join(f"model.{k}" for k in differ) + " must equal the teacher's")


def student_from_teacher(student_cfg: config_lib.ModelConfig, layers: tuple[int, ...],
                         teacher: Teacher) -> dict:
  """Student params: the teacher's stacked layers `layers` (in that order), everything else
  (embeddings, final norm, head) copied; host arrays in the student's layout and dtypes."""
  layers = np.asarray(layers)
  _, abstract = transformer.abstract_params(student_cfg)
  source = jax.tree.map(np.asarray, teacher.params)

  def pick(path, want):
    keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    value = source
    for key in keys:
      value = value[key]
    if keys[0] in ("blocks", "moe_blocks"):
      value = value[layers]
    if value.shape != want.shape:
      raise config_lib.ConfigError(f"teacher param {'/'.join(map(str, keys))} has shape "
                                   f"{value.shape}, the student needs {want.shape}")
    return value.astype(want.dtype)

  return jax.tree_util.tree_map_with_path(pick, abstract)

