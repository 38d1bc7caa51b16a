"""Llama-3-8B (Llama 3.1 shapes: 32 layers, d_model 4096, 32 query / 8 KV heads, d_ff 14336,
vocab 128256, RoPE theta 5e5 with Llama-3 scaling) pre-training at 8k context.

Mesh presets by argument: `--config=experiments/llama3_8b.py:gpu8` (one 8-GPU host, FSDP=8),
`:v5p-64` (32 chips: FSDP=32), `:v6e-256` (data 4 x FSDP 64, one slice per data replica over
DCN), `:fsdp` (the default: FSDP over every device). Plan before launching:
  python -m jaxllm.plan --config=experiments/llama3_8b.py:gpu8 --num_devices=8
"""

import ml_collections

import experiments
from experiments import tiny

# name -> (mesh axes, grad_accum)
PRESETS = {
    "fsdp": (dict(fsdp=-1), 1),
    "gpu8": (dict(fsdp=8), 32),
    "v5p-64": (dict(fsdp=32), 8),
    "v6e-256": (dict(data=4, fsdp=64, slices=4), 1),
}


def get_config(mesh: str = "fsdp") -> ml_collections.ConfigDict:
  c = tiny.get_config()
  c.name = "llama3_8b"
  c.model.update(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                 head_dim=128, d_ff=14336, max_seq_len=8192, rope_theta=500_000.0,
                 rope_scaling="llama3", rope_scaling_factor=8.0, norm_eps=1e-5,
                 tie_embeddings=False, dtype="bfloat16", param_dtype="float32", remat="full")
  c.train.update(steps=100_000, batch_size=256, seq_len=8192, lr=3e-4, warmup_steps=2000,
                 eval_every=1000, checkpoint_every=1000, log_every=10)
  return experiments.apply_mesh_preset(c, PRESETS, mesh)
