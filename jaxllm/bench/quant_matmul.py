"""`jaxllm.bench quant_matmul`: the fused int4 kernel against its peers, in the same run.

For each (M, I, O) (decode-sized M, Llama-3-8B projection shapes on GPU), group size 128, bf16
activations:
  fused        `pallas_kernels.int4_matmul` (weights read as 4-bit values), block_n 64,
               split_k chosen to give the GPU enough programs
  fused_alt    the same without splitting the groups (M <= 16), or with block_n 128
  dequant_xla  jit(x @ QTensor.dequantize(bf16)): XLA dequantizes, then multiplies (it may fuse)
  bf16         the same matmul against a plain bf16 weight (what int4 has to beat)
Times are per matmul: medians of `repeats` jitted calls that each run the matmul over `copies`
weight copies (the copies keep the weights out of L2 and amortise host dispatch); "weight GB/s"
is stored weight bytes / time.
On CPU the kernel runs interpreted at tiny sizes: plumbing, not speed.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.quant import tensor as qtensor
from pallas_kernels.int4_matmul import int4_matmul

PEERS = ("fused", "dequant_xla", "bf16")


def _per_call_seconds(fn, x, weights, repeats):
  """Median time of one fn(x, w) call: `lax.map` runs it over every weight copy inside one
  jitted call, so host dispatch (tens of us, longer than a small matmul) is paid once per
  `len(weights)` calls and the copies keep the weights out of L2."""
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *weights)
  many = jax.jit(lambda x, ws: jax.lax.map(lambda w: fn(x, w), ws))
  jax.block_until_ready(many(x, stacked))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(many(x, stacked))
    times.append(time.perf_counter() - start)
  return statistics.median(times) / len(weights)


def run(shapes, *, group_size: int = 128, repeats: int = 20, copies: int = 16) -> dict:
  interpret = jax.default_backend() != "gpu"
  rows = []
  for M, I, O in shapes:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((M, I)), jnp.bfloat16)
    weights = [jnp.asarray(rng.standard_normal((I, O)) * 0.02, jnp.float32)
               for _ in range(copies)]
    quantized = [qtensor.quantize(w, bits=4, group_size=group_size) for w in weights]
    dense = [w.astype(jnp.bfloat16) for w in weights]
    q0 = quantized[0]
    alt = dict(split_k=1) if M <= 16 else dict(block_n=128)
    fused = lambda x, q: int4_matmul(x, q.values, q.scales, None, interpret=interpret)
    fused_bn = lambda x, q: int4_matmul(x, q.values, q.scales, None, interpret=interpret, **alt)
    deq = lambda x, q: x @ q.dequantize(jnp.bfloat16)
    plain = lambda x, w: x @ w
    want = np.asarray(x.astype(jnp.float32) @ q0.dequantize(), np.float32)
    err = float(np.abs(np.asarray(jax.jit(fused)(x, q0), np.float32) - want).max()
                / np.abs(want).max())
    row = {"M": M, "I": I, "O": O, "group_size": group_size, "fused_rel_err": err,
           "int4_bytes": q0.nbytes, "bf16_bytes": I * O * 2}
    timings = {
        "fused": (fused, quantized, q0.nbytes),
        "fused_alt": (fused_bn, quantized, q0.nbytes),
        "dequant_xla": (deq, quantized, q0.nbytes),
        "bf16": (plain, dense, I * O * 2),
    }
    for name, (fn, ws, nbytes) in timings.items():
      seconds = _per_call_seconds(fn, x, ws, repeats)
      row[f"{name}_us"] = seconds * 1e6
      row[f"{name}_weight_gbps"] = nbytes / seconds / 1e9
    row["fused_alt"] = "split_k 1" if M <= 16 else "block_n 128"
    row["fused_vs_dequant_xla"] = row["dequant_xla_us"] / row["fused_us"]
    row["fused_vs_bf16"] = row["bf16_us"] / row["fused_us"]
    rows.append(row)
  device = jax.devices()[0]
  return {"suite": "quant_matmul", "backend": jax.default_backend(),
          "device_kind": device.device_kind, "jax": jax.__version__, "interpret": interpret,
          "date": time.strftime("%Y-%m-%d"), "rows": rows}


def table(result: dict) -> str:
  head = (f"int4 matmul (g={result['rows'][0]['group_size']}, bf16 activations): "
          f"{result['device_kind']} ({result['backend']}, jax {result['jax']}, {result['date']})"
          + ("  [interpreted kernel: not a speed measurement]" if result["interpret"] else ""))
  lines = [head, "| M | I | O | fused us | fused alt us | dequant+XLA us | bf16 us | fused vs dequant | "
           "fused vs bf16 | fused weight GB/s | bf16 weight GB/s | rel err |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in result["rows"]:
    lines.append(f"| {r['M']} | {r['I']} | {r['O']} | {r['fused_us']:.1f} | "
                 f"{r['fused_alt_us']:.1f} ({r['fused_alt']}) | "
                 f"{r['dequant_xla_us']:.1f} | {r['bf16_us']:.1f} | "
                 f"{r['fused_vs_dequant_xla']:.2f}x | {r['fused_vs_bf16']:.2f}x | "
                 f"{r['fused_weight_gbps']:.0f} | {r['bf16_weight_gbps']:.0f} | "
                 f"{r['fused_rel_err']:.1e} |")
  return "\n".join(lines)
