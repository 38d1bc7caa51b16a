"""Sequence parallelism's effect on one compiled train step (CPU, 2 simulated devices):
collectives in the compiled HLO and XLA's temporary-buffer size, tensor=2 with and without
`mesh.sequence_parallel`.

  python tools/sp_memory.py [--seq_len=128 --d_model=256]
"""

import os
import re
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Training sequence length.")
_D_MODEL = flags.DEFINE_integer("d_model", 256, "Model width.")


def main(argv):
  del argv
  import jax
  import numpy as np
  from jaxllm import config as config_lib
  from jaxllm.parallel import mesh as mesh_lib, rules
  from jaxllm.train import loop, step as step_lib
  model = dict(vocab_size=384, d_model=_D_MODEL.value, n_layers=2, n_heads=8, n_kv_heads=8,
               head_dim=_D_MODEL.value // 8, d_ff=2 * _D_MODEL.value, dtype="float32",
               max_seq_len=max(2048, _SEQ_LEN.value))
  for sp in (False, True):
    cfg = config_lib.from_config_dict({
        "model": model, "train": dict(batch_size=8, seq_len=_SEQ_LEN.value),
        "mesh": dict(data=1, tensor=2, sequence_parallel=sp)})
    mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[:2])
    graphdef, abstract, shardings, optimizer = loop.state_shardings(cfg, mesh)
    step = jax.jit(step_lib.make_train_step(graphdef, optimizer, cfg.train),
                   in_shardings=(shardings, rules.batch_sharding(mesh)),
                   out_shardings=(shardings, None))
    S, B, T = jax.ShapeDtypeStruct, 8, _SEQ_LEN.value
    batch = {k: S((B, T), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
    batch["weights"] = S((B, T), np.float32)
    with jax.set_mesh(mesh):
      compiled = step.lower(abstract, batch).compile()
    text = compiled.as_text()
    ops = {op: len(re.findall(rf"= \S+ {op}\(", text))
           for op in ("all-reduce", "reduce-scatter", "all-gather")}
    temp = compiled.memory_analysis().temp_size_in_bytes / 2 ** 20
    print(f"sequence_parallel={sp}: {ops}, temporaries {temp:.1f} MiB per device")


if __name__ == "__main__":
  app.run(main)
