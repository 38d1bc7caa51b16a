"""A ~1.2B Llama (Llama 3.2 1B shapes: 16 layers, d_model 2048, 32 query / 8 KV heads of 64,
d_ff 8192, vocab 128256, tied embeddings, RoPE theta 5e5 with Llama-3 scaling) trained on one
accelerator: the model of the single-GPU MFU and decode measurements (`tools/gpu_checks.sh
train` and `decode`), with random weights (no checkpoint is downloaded).

Presets by argument: `--config=experiments/llama_1b.py:gpu1` (the default: one device, batch
8 x 4096 tokens, no remat; the plan estimates 87 GiB per device, an H200's size),
`:gpu1_remat` (the same with full remat: 54 GiB, for 80-GB cards). Check the memory first:
  python -m jaxllm.plan --config=experiments/llama_1b.py --num_devices=1
(on a CPU host the compiled figure counts XLA's attention, which a GPU does not run).
"""

import ml_collections

import experiments
from experiments import tiny

# name -> (mesh axes, grad_accum)
PRESETS = {
    "gpu1": (dict(data=1), 1),
    "gpu1_remat": (dict(data=1), 1),
}


def get_config(mesh: str = "gpu1") -> ml_collections.ConfigDict:
  c = tiny.get_config()
  c.name = "llama_1b"
  c.model.update(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                 head_dim=64, d_ff=8192, max_seq_len=8192, rope_theta=500_000.0,
                 rope_scaling="llama3", rope_scaling_factor=32.0, norm_eps=1e-5,
                 tie_embeddings=True, dtype="bfloat16", param_dtype="float32",
                 remat="full" if mesh == "gpu1_remat" else "none")
  c.train.update(steps=10_000, batch_size=8, seq_len=4096, lr=3e-4, warmup_steps=500,
                 eval_every=500, checkpoint_every=500, log_every=10)
  return experiments.apply_mesh_preset(c, PRESETS, mesh)
