"""Mixtral-8x7B (32 layers, d_model 4096, 32 query / 8 KV heads, 8 experts of width 14336 with
2 chosen per token, vocab 32000, RoPE theta 1e6): 46.7B parameters, 12.9B active per token,
pre-training at 4k context.

Mesh presets by argument (experts over `expert`, everything else FSDP over `fsdp`):
  `:gpu8`      one 8-GPU host (141 GB H200s): expert 8
  `:gpu64`     8 hosts x 8 GPUs: expert 8 inside each host (NVLink all-to-all), FSDP 8 across
  `:v5p-128`   64 chips: expert 8 x FSDP 8
  `:v6e-256`   256 chips: expert 8 x FSDP 32
  `:fsdp`      the default: FSDP over every device, experts replicated
  python -m jaxllm.plan --config=experiments/mixtral_8x7b.py:gpu64 --num_devices=64
"""

import ml_collections

import experiments
from experiments import tiny

# name -> (mesh axes, grad_accum)
PRESETS = {
    "fsdp": (dict(fsdp=-1), 1),
    "gpu8": (dict(expert=8), 32),
    "gpu64": (dict(fsdp=8, expert=8), 4),
    "v5p-128": (dict(fsdp=8, expert=8), 4),
    "v6e-256": (dict(fsdp=32, expert=8), 1),
}


def get_config(mesh: str = "fsdp") -> ml_collections.ConfigDict:
  c = tiny.get_config()
  c.name = "mixtral_8x7b"
  c.model.update(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                 head_dim=128, d_ff=14336, max_seq_len=32768, rope_theta=1_000_000.0,
                 norm_eps=1e-5, tie_embeddings=False, dtype="bfloat16", param_dtype="float32",
                 remat="full", n_experts=8, experts_per_token=2, moe_d_ff=14336,
                 norm_topk_prob=True)
  c.train.update(steps=100_000, batch_size=256, seq_len=4096, lr=3e-4, warmup_steps=2000,
                 eval_every=1000, checkpoint_every=1000, log_every=10, moe_aux_loss=0.02,
                 router_z_loss=0.001)
  return experiments.apply_mesh_preset(c, PRESETS, mesh)
