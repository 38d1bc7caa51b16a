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
