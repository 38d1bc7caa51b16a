"""Llama-2-70B (80 layers, d_model 8192, 64 query / 8 KV heads, d_ff 28672, vocab 32000, RoPE
theta 1e4) pre-training at 4k context.

Mixed-precision Adam needs 16 bytes per parameter (1.1 TB here) before activations, so this
does not fit one 8-GPU host; the presets shard it over pods:
  `:gpu64`    8 hosts x 8 GPUs: tensor 8 inside each host (NVLink), FSDP 8 across hosts
  `:v5p-256`  128 chips: FSDP 128
  `:v6e-256`  256 chips: FSDP 64 x tensor 4
  `:fsdp`     the default: FSDP over every device
  python -m jaxllm.plan --config=experiments/llama2_70b.py:gpu64 --num_devices=64
"""

import ml_collections

import experiments
from experiments import tiny

# name -> (mesh axes, grad_accum)
PRESETS = {
    "fsdp": (dict(fsdp=-1), 1),
    "gpu64": (dict(fsdp=8, tensor=8), 128),
    "v5p-256": (dict(fsdp=128), 8),
    "v6e-256": (dict(fsdp=64, tensor=4), 16),
}


def get_config(mesh: str = "fsdp") -> ml_collections.ConfigDict:
  c = tiny.get_config()
  c.name = "llama2_70b"
  c.model.update(vocab_size=32000, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                 head_dim=128, d_ff=28672, max_seq_len=4096, rope_theta=10_000.0, norm_eps=1e-5,
                 tie_embeddings=False, dtype="bfloat16", param_dtype="float32", remat="full")
  c.train.update(steps=100_000, batch_size=1024, seq_len=4096, lr=1.5e-4, warmup_steps=2000,
                 eval_every=1000, checkpoint_every=1000, log_every=10)
  return experiments.apply_mesh_preset(c, PRESETS, mesh)
