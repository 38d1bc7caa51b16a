"""The workdir layout every checkpoint reader and writer shares: config.json (the experiment
config), tokenizer.model, checkpoints/<step>/, metrics.jsonl, tb/.

Training writes it (`jaxllm.train.workdir` adds the resume checks and the tokenizer); `load`,
convert and quantize read it.
"""

from __future__ import annotations

import json
import os

from jaxllm import config as config_lib

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


def read_config(workdir: str) -> config_lib.Config:
  path = os.path.join(workdir, CONFIG_FILE)
  with open(path) as f:
    return config_lib.from_dict(json.load(f))


def write_config(workdir: str, config: config_lib.Config) -> None:
  """Atomically: a crash mid-write leaves the previous config.json."""
  path = os.path.join(workdir, CONFIG_FILE)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(config.to_dict(), f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def has_checkpoints(workdir: str) -> bool:
  ckpt = os.path.join(workdir, CHECKPOINT_DIR)
  return os.path.isdir(ckpt) and any(name.isdigit() for name in os.listdir(ckpt))
