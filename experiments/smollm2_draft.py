"""A speculative draft for SmolLM2-135M-Instruct, distilled from it on the standard library:
4 of its 30 layers (0, 10, 19, 29) with its embeddings and head, trained on the teacher's
distribution alone (alpha 1, temperature 1). The head (49152 x 576, tied) is most of the
draft's cost per token, so 4 layers make it ~3x cheaper than the teacher, not 7x.

python -m jaxllm.distill --teacher=$(python -m jaxllm.fetch smollm2-135m) \\
    --config=experiments/smollm2_draft.py --workdir=runs/smollm2_draft
python -m jaxllm.bench decode --drafts=ngram:3,int4,runs/smollm2_draft --decode_peers=jaxllm_fp32
"""

import ml_collections

from experiments import tiny


def get_config() -> ml_collections.ConfigDict:
  c = tiny.get_config()
  c.name = "smollm2_draft"
  # SmolLM2-135M's architecture (its GGUF's), 4 layers deep.
  c.model.update(vocab_size=49152, d_model=576, n_layers=4, n_heads=9, n_kv_heads=3,
                 head_dim=64, d_ff=1536, max_seq_len=8192, rope_theta=100_000.0,
                 norm_eps=1e-5, tie_embeddings=True, dtype="float32")
  c.train.update(steps=120, batch_size=8, seq_len=256, lr=3e-4, warmup_steps=10,
                 min_lr_ratio=0.1, z_loss=0.0, log_every=5, eval_every=60, eval_batches=4,
                 checkpoint_every=30)
  c.distill.update(alpha=1.0, temperature=1.0, top_k=0, init_layers="0,10,19,29")
  return c
