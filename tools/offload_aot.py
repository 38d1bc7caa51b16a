"""Host offload compiled for a 4-chip v5p slice (libtpu's compiler, no TPU needed): per-chip
device and host bytes of the tiny model's train step (2 layers, seq 256, data 2 x fsdp 2) with
and without train.offload_optimizer and model.remat=offload_dots, beside jaxllm.plan's figures.

  python tools/offload_aot.py > tools/results/<dir>/offload_aot.txt
"""

import json

from experiments import tiny
from jaxllm import config as config_lib
from jaxllm.planner import aot, plan


def config(offload_optimizer: bool, remat: str) -> config_lib.Config:
  c = tiny.get_config()
  c.model.update(n_layers=2, max_seq_len=256, remat=remat)
  c.train.update(batch_size=8, seq_len=256, offload_optimizer=offload_optimizer)
  c.mesh.update(data=2, fsdp=2)
  return config_lib.from_config_dict(c)


def main():
  target = aot.tpu_target("v5p-8")
  for offload, remat in [(False, "none"), (True, "none"), (False, "offload_dots"),
                         (True, "offload_dots"), (False, "full")]:
    cfg = config(offload, remat)
    got = aot.compile_for_tpu(cfg, target)
    planned = plan.plan(cfg, 4, compile_check=False, platform="tpu")
    keys = ("argument_bytes", "host_argument_bytes", "temp_bytes", "host_temp_bytes",
            "peak_bytes")
    print(json.dumps({"offload_optimizer": offload, "remat": remat,
                      **{k: got[k] for k in keys},
                      "plan_argument_bytes": planned["argument_bytes"],
                      "plan_host_argument_bytes": planned["host_argument_bytes"]}))


if __name__ == "__main__":
  main()
