"""Context parallelism's effect on one compiled train step (CPU, simulated devices): XLA's
temporary-buffer size per device against sequence length, `mesh.context` 1, 2 and 4, for each
`train.context_parallel` strategy (compiled memory analysis, nothing run).

  python tools/cp_memory.py [--seq_lens=512,1024,2048 --contexts=1,2,4 \
      --strategies=all_gather,ring]
"""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

_SEQ_LENS = flags.DEFINE_list("seq_lens", ["512", "1024", "2048"], "Sequence lengths.")
_CONTEXTS = flags.DEFINE_list("contexts", ["1", "2", "4"], "mesh.context values.")
_STRATEGIES = flags.DEFINE_list("strategies", ["all_gather", "ring"],
                                "train.context_parallel values.")


def temporaries_mib(seq_len: int, context: int, strategy: str) -> float:
  import jax
  import numpy as np
  from jaxllm import config as config_lib
  from jaxllm.parallel import mesh as mesh_lib, rules
  from jaxllm.train import loop, step as step_lib
  cfg = config_lib.from_config_dict({
      "model": dict(vocab_size=384, d_model=256, n_layers=2, n_heads=8, n_kv_heads=8,
                    head_dim=32, d_ff=512, dtype="float32", max_seq_len=max(seq_len, 2048)),
      "train": dict(batch_size=2, seq_len=seq_len, context_parallel=strategy),
      "mesh": dict(data=1, context=context)})
  mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[:context])
  graphdef, abstract, shardings, optimizer = loop.state_shardings(cfg, mesh)
  step = jax.jit(step_lib.make_train_step(graphdef, optimizer, cfg.train),
                 in_shardings=(shardings, rules.batch_sharding(mesh)),
                 out_shardings=(shardings, None))
  S = jax.ShapeDtypeStruct
  batch = {k: S((2, seq_len), np.int32) for k in ("inputs", "targets", "segment_ids",
                                                   "positions")}
  batch["weights"] = S((2, seq_len), np.float32)
  with jax.set_mesh(mesh):
    compiled = step.lower(abstract, batch).compile()
  return compiled.memory_analysis().temp_size_in_bytes / 2 ** 20


def main(argv):
  del argv
  runs = [(c, s) for c in (int(c) for c in _CONTEXTS.value)
          for s in (_STRATEGIES.value if c > 1 else ["-"])]
  print("| seq_len | " + " | ".join(f"context={c} {s} (MiB)" for c, s in runs) + " |")
  print("|---|" + "---|" * len(runs))
  for T in (int(t) for t in _SEQ_LENS.value):
    cells = [f"{temporaries_mib(T, c, 'all_gather' if s == '-' else s):.1f}" for c, s in runs]
    print(f"| {T} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
  app.run(main)
