"""Small configs and helpers shared by tests."""

import os

from jaxllm import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_model(**overrides) -> config_lib.ModelConfig:
  values = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                d_ff=64, max_seq_len=128)
  values.update(overrides)
  return config_lib.ModelConfig(**values)


def tiny_experiment(**sections) -> config_lib.Config:
  """A seconds-long training config on the stdlib corpus (small tokenizer, small model)."""
  values = {
      "name": "test",
      "model": dict(vocab_size=384, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                    head_dim=8, d_ff=64, max_seq_len=128),
      "data": dict(tokenizer_max_sentences=20_000),
      "train": dict(steps=20, batch_size=8, seq_len=32, lr=3e-3, warmup_steps=2, log_every=1,
                    eval_every=10, eval_batches=2, checkpoint_every=10),
      "mesh": dict(data=-1),
  }
  for key, value in sections.items():
    values[key] = {**values.get(key, {}), **value}
  return config_lib.from_config_dict(values)
