"""Experiment files: each defines get_config() -> ml_collections.ConfigDict."""


def apply_mesh_preset(config, presets: dict, name: str):
  """Sets `config.mesh` and `config.train.grad_accum` from `presets[name]`, a pair
  (mesh axes and `slices`; the rest are 1, grad_accum). Returns `config`."""
  if name not in presets:
    raise ValueError(f"unknown mesh preset {name!r} (one of {', '.join(presets)})")
  axes, grad_accum = presets[name]
  config.mesh.update({**dict(data=1, fsdp=1, tensor=1, stage=1, expert=1, slices=1), **axes})
  # Sized for one sequence per device per microbatch; accumulation reaches the global batch.
  config.train.grad_accum = grad_accum
  return config


# Fine-tuning an 8B base (Llama-3-8B's shape) on an accelerator: name -> section overrides.
# Activations need remat=full and bfloat16 compute at these lengths. The mesh is the command's
# --mesh (given here in each comment); plan one before launching:
#   python -m jaxllm.plan --config=experiments/sft_smollm2.py:gpu8-8b \
#       --base=experiments/llama3_8b.py --mesh=fsdp=8
FINETUNE_8B_PRESETS = {
    # one 80 GB GPU: QLoRA (int4 base), 16 rows of 2048 tokens in 8 microbatches
    "h100-8b": dict(finetune=dict(method="qlora"),
                    train=dict(batch_size=16, seq_len=2048, grad_accum=8)),
    # one 8-GPU host, --mesh=fsdp=8: LoRA on the float base split 8 ways, 64 rows of 4096
    "gpu8-8b": dict(finetune=dict(method="lora"),
                    train=dict(batch_size=64, seq_len=4096, grad_accum=4)),
    # a v5p-8 slice (4 chips of 95 GB), --mesh=fsdp=4: LoRA, 32 rows of 4096 tokens
    "v5p-8b": dict(finetune=dict(method="lora"),
                   train=dict(batch_size=32, seq_len=4096, grad_accum=4)),
}


def apply_finetune_preset(config, name: str, rows_per_example: int = 1):
  """`config` (a fine-tuning experiment) with `FINETUNE_8B_PRESETS[name]`: remat full, bfloat16
  compute, 2000 steps at lr 2e-4 and the preset's method and sizes (`rows_per_example` 2 for
  DPO: a pair is two sequences, so half the examples per step and per microbatch). "laptop":
  unchanged."""
  if name == "laptop":
    return config
  if name not in FINETUNE_8B_PRESETS:
    raise ValueError(f"unknown preset {name!r} (laptop, {', '.join(FINETUNE_8B_PRESETS)})")
  sections = FINETUNE_8B_PRESETS[name]
  config.finetune.update(remat="full", compute_dtype="bfloat16", **sections["finetune"])
  train = dict(sections["train"])
  train["batch_size"] //= rows_per_example  # as many sequences per microbatch
  config.train.update(steps=2000, lr=2e-4, warmup_steps=50, eval_every=200,
                      checkpoint_every=200, **train)
  return config
