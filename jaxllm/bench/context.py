"""Context parallelism: per-device memory of the configured train step against sequence length,
for `mesh.context` 1, 2, 4, ... and each `train.context_parallel` strategy.

Nothing runs: each step is compiled for its devices from abstract inputs and XLA's memory
analysis gives the per-device temporaries (activations, gathered K/V, scores, workspace) and the
peak (arguments + outputs + temporaries + code). Beside them: `jaxllm.plan`'s activation
estimate for the same mesh, and the collectives the compiled step issues (the ring strategy's
`collective-permute`s, the all-gather strategy's `all-gather`s). The configured mesh's fsdp,
tensor (with `sequence_parallel`) and stage axes are kept; data is 1 so that each row is one
batch's memory on one device.

`python -m jaxllm.bench context --seq_lens=1024,2048,4096 --contexts=1,2,4
    [--strategies=all_gather,ring] [--config.mesh.tensor=2 --config.mesh.sequence_parallel=true]
    [--tpu=v5p-8]`

`--tpu` compiles for the chips of a Cloud TPU slice with libtpu's compiler instead (no TPU
needed): there the attention is our Mosaic flash kernel, inside every ring block too, where on
CPU it is the XLA path.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax

from jaxllm import config as config_lib

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "collective-permute", "all-to-all")


def _variant(cfg: config_lib.Config, seq_len: int, context: int,
             strategy: str) -> tuple[config_lib.Config, int]:
  """`cfg` at `seq_len` tokens per row on a data=1 mesh with `context` devices per row, and
  that mesh's device count."""
  fixed = {k: max(getattr(cfg.mesh, k), 1) for k in ("fsdp", "tensor", "stage", "expert")}
  out = dataclasses.replace(
      cfg, model=dataclasses.replace(cfg.model, max_seq_len=max(cfg.model.max_seq_len, seq_len)),
      train=dataclasses.replace(cfg.train, seq_len=seq_len, context_parallel=strategy),
      mesh=dataclasses.replace(cfg.mesh, data=1, context=context, **fixed))
  config_lib.validate(out)
  return out, context * math.prod(fixed.values())


def collective_counts(hlo_text: str) -> dict[str, int]:
  """How many of each collective a compiled program's HLO issues (async `-start` halves
  counted once)."""
  # The result's shape may be a tuple with spaces (TPU's async starts): anything but "=".
  return {op: len(re.findall(rf"= [^=\n]*? {op}(?:-start)?\(", hlo_text)) for op in COLLECTIVES}


def run(cfg: config_lib.Config, *, seq_lens: tuple[int, ...], contexts: tuple[int, ...],
        strategies: tuple[str, ...] = config_lib.CONTEXT_PARALLEL,
        tpu: str | None = None) -> dict:
  """One row per (sequence length, context size, strategy); context 1 is measured once.
  `tpu`: an accelerator type (`v5p-8`) whose chips to compile for, instead of this host's
  devices."""
  from jaxllm.planner import aot, plan
  if tpu:
    target = aot.tpu_target(tpu)
    devices, platform, backend = aot.topology_devices(target), "tpu", f"tpu {target.name}"
  else:
    devices = jax.devices()
    platform = backend = jax.default_backend()
  rows = []
  for seq_len in seq_lens:
    for context in contexts:
      for strategy in strategies if context > 1 else strategies[:1]:
        variant, n = _variant(cfg, seq_len, context, strategy)
        if n > len(devices):
          raise ValueError(f"context={context} on mesh {variant.mesh} needs {n} devices; "
                           f"{config_lib.devices_available(len(devices))}")
        config_lib.validate_for_devices(variant, n, platform)
        compiled, seconds = aot.compiled_train_step(variant, devices[:n])
        memory = aot.analysis(compiled, seconds)
        estimate = plan.plan(variant, n, compile_check=False, platform=platform)
        rows.append({
            "seq_len": seq_len, "context": context,
            "strategy": strategy if context > 1 else "-", "devices": n,
            "temp_bytes": memory.get("temp_bytes"), "peak_bytes": memory.get("peak_bytes"),
            "plan_activation_bytes": estimate["activation_bytes"],
            "collectives": collective_counts(compiled.as_text()),
            "compile_s": seconds})
  one_device = {r["seq_len"]: r["temp_bytes"] for r in rows if r["context"] == 1}
  for row in rows:  # the saving against one device at the same length
    base = one_device.get(row["seq_len"])
    row["temp_vs_context1"] = (row["temp_bytes"] / base
                               if base and row["temp_bytes"] is not None else None)
  m = cfg.model
  return {"suite": "context", "backend": backend,
          "model": dict(d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads,
                        n_kv_heads=m.n_kv_heads, head_dim=m.head_dim, dtype=m.dtype,
                        remat=m.remat),
          "batch_size": cfg.train.batch_size,
          "mesh": {k: max(getattr(cfg.mesh, k), 1) for k in ("fsdp", "tensor", "stage")}
          | {"sequence_parallel": cfg.mesh.sequence_parallel},
          "rows": rows}


def table(result: dict) -> str:
  mib = lambda b: "-" if b is None else f"{b / 2 ** 20:.1f}"
  m = result["model"]
  lines = [f"context parallelism on {result['backend']}: per-device memory of one compiled "
           f"train step (batch {result['batch_size']}, d_model {m['d_model']}, {m['n_layers']} "
           f"layers, {m['dtype']}, remat {m['remat']}, mesh {result['mesh']} x context)", "",
           "| seq_len | context | strategy | temporaries (MiB) | vs context 1 | peak (MiB) | "
           "plan activations (MiB) | collectives |", "|---|---|---|---|---|---|---|---|"]
  for r in result["rows"]:
    ratio = "-" if r["temp_vs_context1"] is None else f"{r['temp_vs_context1']:.2f}"
    ops = ", ".join(f"{n} {op}" for op, n in r["collectives"].items() if n) or "none"
    lines.append(f"| {r['seq_len']} | {r['context']} | {r['strategy']} | "
                 f"{mib(r['temp_bytes'])} | {ratio} | {mib(r['peak_bytes'])} | "
                 f"{mib(r['plan_activation_bytes'])} | {ops} |")
  return "\n".join(lines)
