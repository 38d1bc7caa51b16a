"""`python -m jaxllm.plan [--config=FILE] [--config.mesh.fsdp=8 ...] [--num_devices=N] [--json]`

Prints the per-device memory of a training config (params, grads, optimizer state,
activations under the chosen remat policy) and the pipeline bubble, without allocating the
model. Plans any device count; when the mesh fits this machine's devices it also compiles the
train step abstractly and reports the compiler's own memory analysis (`--nocompile` skips it).
"""

from __future__ import annotations

import json

from absl import app, flags

from jaxllm.cli import common

_CONFIG = common.define_config_flag(common.default_experiment())
_NUM_DEVICES = flags.DEFINE_integer("num_devices", None, "Devices to plan for (default: this "
                                    "machine's).", lower_bound=1)
_COMPILE = flags.DEFINE_bool("compile", True, "Also compile the step for the compiler's memory "
                             "analysis when the mesh fits the local devices.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")


@common.one_line_errors
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from jaxllm import config as config_lib
  cfg = config_lib.from_config_dict(common.config_value(_CONFIG))
  import jax
  from jaxllm.parallel import plan
  num_devices = _NUM_DEVICES.value or jax.device_count()
  micro = cfg.train.batch_size // cfg.train.grad_accum
  sizes = config_lib.resolve_mesh_shape(cfg.mesh, num_devices)
  shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
  if micro % shards:
    raise config_lib.ConfigError(
        f"train.batch_size / train.grad_accum = {micro} is not divisible by the "
        f"{shards} batch shards (mesh.data x mesh.fsdp x mesh.expert)")
  if sizes["expert"] > 1 and cfg.model.n_experts % sizes["expert"]:
    raise config_lib.ConfigError(f"model.n_experts={cfg.model.n_experts} is not divisible by "
                                 f"mesh.expert={sizes['expert']}")
  result = plan.plan(cfg, num_devices, compile_check=_COMPILE.value)
  print(json.dumps(result) if _JSON.value else plan.table(result))


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
