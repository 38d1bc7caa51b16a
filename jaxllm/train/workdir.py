"""The training workdir (layout: `jaxllm.checkpoint.workdir`): resume checks and the tokenizer.

Resuming is refused, before anything in the workdir changes, when the model shapes in the new
config differ from those the checkpoints were written with.
"""

from __future__ import annotations

import os

from jaxllm import config as config_lib
# The layout lives with the checkpoints; training code keeps reaching it through this module.
from jaxllm.checkpoint.workdir import (
    CHECKPOINT_DIR, CONFIG_FILE, METRICS_FILE, TB_DIR, TOKENIZER_FILE, has_checkpoints,
    read_config, write_config)
from jaxllm.data import corpus as corpus_lib
from jaxllm.data import pipeline, tokenizer as tokenizer_lib

__all__ = ["CHECKPOINT_DIR", "CONFIG_FILE", "METRICS_FILE", "TB_DIR", "TOKENIZER_FILE",
           "check_resumable", "has_checkpoints", "local_checkpoint_dir", "prepare_tokenizer",
           "read_config", "save_tokenizer", "write_config"]

# Model keys that change parameter shapes or meaning; train.* may change between runs.
_SHAPE_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
               "tie_embeddings", "param_dtype", "qkv_bias", "qk_norm", "qk_norm_over_heads",
               "norm_placement", "norm_offset", "embed_scale", "mlp_activation", "n_experts",
               "moe_d_ff", "n_shared_experts", "shared_expert_gate", "first_dense_layers",
               "moe_every")



def check_resumable(workdir: str, config: config_lib.Config) -> None:
  """Raises ConfigError if the workdir holds checkpoints of a differently shaped model."""
  if not has_checkpoints(workdir) or not os.path.exists(os.path.join(workdir, CONFIG_FILE)):
    return
  try:
    saved = read_config(workdir)
  except (OSError, ValueError) as e:
    raise config_lib.ConfigError(f"{workdir}/{CONFIG_FILE} is unreadable ({e}); "
                                 "use a new --workdir") from None
  for key in _SHAPE_KEYS + ("router_bias_update_rate",):
    old, new = getattr(saved.model, key), getattr(config.model, key)
    if key == "router_bias_update_rate":  # only whether the routing bias exists is a shape
      if (old > 0) == (new > 0):
        continue
    if old != new:
      raise config_lib.ConfigError(
          f"model.{key}={new!r} differs from {old!r} in the checkpoints of {workdir}; "
          "use a new --workdir or the original value (checkpoints left untouched)")
  # The loss scale is a part of the saved train state only when the run scales its loss.
  if config_lib.loss_scaling_on(saved) != config_lib.loss_scaling_on(config):
    raise config_lib.ConfigError(
        f"loss scaling is {'on' if config_lib.loss_scaling_on(config) else 'off'} "
        f"(train.loss_scaling={config.train.loss_scaling!r}, model.dtype={config.model.dtype}) "
        f"but the checkpoints of {workdir} were written with it "
        f"{'on' if config_lib.loss_scaling_on(saved) else 'off'}; use a new --workdir or "
        "set train.loss_scaling to match")
  # The data iterator's saved state has one part per source and the packing's own layout; the
  # weights, paths and order may change between runs, these may not.
  for key, old, new in (
      ("data.packing", saved.data.packing, config.data.packing),
      ("data.sources names", list(config_lib.parse_sources(saved.data.sources)),
       list(config_lib.parse_sources(config.data.sources)))):
    if old != new:
      raise config_lib.ConfigError(
          f"{key} {new!r} differs from {old!r} in the checkpoints of {workdir}, whose data "
          "iterator state it cannot resume; use a new --workdir or the original value")


LOCAL_OWNER_FILE = "workdir.txt"


def local_checkpoint_dir(workdir: str, local_dir: str) -> str:
  """The local tier's checkpoint directory for `workdir` (train.local_checkpoint_dir): it
  records whose it is, and a directory holding another workdir's checkpoints is refused
  (ConfigError) before anything in it changes."""
  owner = os.path.join(local_dir, LOCAL_OWNER_FILE)
  mine = os.path.abspath(workdir)
  if os.path.exists(owner):
    with open(owner) as f:
      theirs = f.read().strip()
    if theirs != mine:
      raise config_lib.ConfigError(
          f"train.local_checkpoint_dir={local_dir} holds the checkpoints of another workdir "
          f"({theirs}); give this run its own directory")
  else:
    os.makedirs(local_dir, exist_ok=True)
    with open(owner, "w") as f:
      f.write(mine + "\n")
  if has_checkpoints(local_dir) and not os.path.exists(os.path.join(workdir, CONFIG_FILE)):
    raise config_lib.ConfigError(
        f"train.local_checkpoint_dir={local_dir} holds checkpoints of an earlier run in "
        f"{workdir}, which has started afresh; remove them or give another directory")
  return os.path.join(local_dir, CHECKPOINT_DIR)


def save_tokenizer(workdir: str, tokenizer) -> None:
  """Writes a given tokenizer (a distillation teacher's) into the workdir, where `load` reads
  it: tokenizer.model or tokenizer.json."""
  from jaxllm.checkpoint import convert
  os.makedirs(workdir, exist_ok=True)
  convert.save_tokenizer(tokenizer, workdir)


def prepare_tokenizer(workdir: str, config: config_lib.Config,
                      corpus: corpus_lib.Corpus) -> tokenizer_lib.SentencePieceTokenizer:
  """The workdir's tokenizer; copied from data.tokenizer or trained on the train split first."""
  path = os.path.join(workdir, TOKENIZER_FILE)
  if os.path.exists(path):
    tok = tokenizer_lib.SentencePieceTokenizer(path)
  elif config.data.tokenizer:
    try:
      tok = tokenizer_lib.SentencePieceTokenizer(config.data.tokenizer)
    except (OSError, RuntimeError) as e:
      raise config_lib.ConfigError(f"data.tokenizer={config.data.tokenizer!r} cannot be loaded "
                                   f"as a sentencepiece model: {e}") from None
    tok.save(path)
  else:
    lines = pipeline.sentences_for_tokenizer(corpus.train, config.data.tokenizer_max_sentences)
    tok = tokenizer_lib.train_sentencepiece(lines, config.model.vocab_size,
                                            max_sentences=config.data.tokenizer_max_sentences)
    tok.save(path)
  if tok.vocab_size > config.model.vocab_size:
    raise config_lib.ConfigError(
        f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
        f"{tok.vocab_size} pieces ({path})")
  return tok
