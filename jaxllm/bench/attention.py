"""`jaxllm.bench attention`: our flash-attention kernel against its peers, in the same run.

For each sequence length, head size and causal/full mask (bf16, multi-head, B * T ≈ 16k tokens,
H * Dh = 2048): forward and forward+backward TFLOP/s of
  ours        `pallas_kernels.flash_attention` (Triton on GPU, Mosaic on TPU)
  ours_mgpu   the same with `backend="mosaic_gpu"`: its Mosaic GPU forward, Triton backward
              (Hopper; on CPU in the interpreter with jax >= 0.11)
  xla         `jax.nn.dot_product_attention(implementation="xla")`
  cudnn       `jax.nn.dot_product_attention(implementation="cudnn")` (GPU)
  jax_pallas  JAX's bundled Pallas kernel (`pallas.ops.gpu.attention.mha` on GPU,
              `pallas.ops.tpu.flash_attention` on TPU)
  jax_pallas_mgpu  JAX's bundled Mosaic GPU kernel (`pallas.ops.gpu.attention_mgpu`, Hopper
              only: warpgroup matmuls, TMA; blocks 64 x 128 forward, 64 x 64 backward; it has
              no softmax scale, so q is scaled first)
plus our kernel's compiled temporary memory for forward+backward (it should grow linearly with
the sequence). FLOPs: 4·B·H·T·S·Dh for the forward (halved when causal), 2.5x that for the
backward. On CPU the Pallas kernels only run interpreted: the numbers check the plumbing, not speed.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from jaxllm.bench import timing
from pallas_kernels import backends

PEERS = ("ours", "ours_mgpu", "xla", "cudnn", "jax_pallas", "jax_pallas_mgpu")


def _flash_peer(name: str, backend: str, interpret: bool, sm_scale: float, causal: bool):
  if name in ("ours", "ours_mgpu"):
    lowering = "mosaic_gpu" if name == "ours_mgpu" else None
    return lambda q, k, v: pallas_kernels.flash_attention(q, k, v, causal=causal,
                                                          sm_scale=sm_scale, backend=lowering,
                                                          interpret=interpret)
  if name in ("xla", "cudnn"):
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=sm_scale, is_causal=causal,
                                                        implementation=name)
  if name == "jax_pallas_mgpu":
    if interpret:
      raise NotImplementedError("the Mosaic GPU kernel has no interpreter: Hopper GPUs only")
    from jax.experimental.pallas.ops.gpu import attention_mgpu
    config = attention_mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2,
                                         causal=causal, block_q_dkv=64, block_kv_dkv=64,
                                         block_q_dq=64, block_kv_dq=64)
    return lambda q, k, v: attention_mgpu.attention((q * sm_scale).astype(q.dtype), k, v, config)
  if backend == "tpu":
    from jax.experimental.pallas.ops.tpu import flash_attention as bundled_tpu

    def bundled(q, k, v):  # it takes [B, H, T, Dh]
      out = bundled_tpu.flash_attention(*(jnp.swapaxes(x, 1, 2) for x in (q, k, v)),
                                        causal=causal, sm_scale=sm_scale)
      return jnp.swapaxes(out, 1, 2)
    return bundled
  from jax.experimental.pallas.ops.gpu import attention as bundled_gpu
  return lambda q, k, v: bundled_gpu.mha(q, k, v, None, sm_scale=sm_scale, causal=causal,
                                         interpret=interpret)


def _fwd_bwd(attn):
  def loss_grads(q, k, v, do):
    _, vjp = jax.vjp(attn, q, k, v)
    return vjp(do)
  return loss_grads


def _temp_bytes(fn, args) -> int | None:
  """The compiler's temporary-buffer size for fn (activations, workspace), or None if unknown."""
  try:
    memory = jax.jit(fn).lower(*args).compile().memory_analysis()
  except Exception:  # noqa: BLE001 - a peer that does not compile here has no figure
    return None
  return None if memory is None else getattr(memory, "temp_size_in_bytes", None)


def run(seq_lens, head_dims, *, tokens: int = 16384, width: int = 2048, repeats: int = 5,
        peers=PEERS, causal_modes=(True, False), batch: int | None = None,
        heads: int | None = None) -> dict:
  backend = backends.resolve(None, interpret=True)
  interpret = jax.default_backend() == "cpu"
  rows = []
  for Dh in head_dims:
    for T in seq_lens:
      B = batch or max(1, tokens // T)
      H = heads or max(1, width // Dh)
      rng = np.random.default_rng(0)
      q, k, v, do = (jnp.asarray(rng.standard_normal((B, T, H, Dh)), jnp.bfloat16)
                     for _ in range(4))
      for causal in causal_modes:
        fwd_flops = 4.0 * B * H * T * T * Dh * (0.5 if causal else 1.0)
        row = {"seq_len": T, "head_dim": Dh, "batch": B, "heads": H, "causal": causal}
        for name in peers:
          for mode, flop in (("fwd", fwd_flops), ("fwd_bwd", 3.5 * fwd_flops)):
            try:
              attn = _flash_peer(name, backend, interpret, Dh ** -0.5, causal)
              fn, args = (attn, (q, k, v)) if mode == "fwd" else (_fwd_bwd(attn), (q, k, v, do))
              seconds = timing.median_seconds(jax.jit(fn), args, repeats)
              row[f"{name}_{mode}_tflops"] = flop / seconds / 1e12
            except Exception as e:  # a peer that does not run here (cudnn on CPU, OOM) is noted
              row[f"{name}_{mode}_tflops"] = None
              row.setdefault("errors", {})[f"{name}_{mode}"] = f"{type(e).__name__}: {e}"[:200]
        for mode in ("fwd", "fwd_bwd"):
          for mine in ("ours", "ours_mgpu"):
            ours = row.get(f"{mine}_{mode}_tflops")
            for peer in ("cudnn", "jax_pallas", "jax_pallas_mgpu", "xla"):
              theirs = row.get(f"{peer}_{mode}_tflops")
              row[f"{mine}_vs_{peer}_{mode}"] = ours / theirs if ours and theirs else None
        for name in ("ours", "xla"):
          if name in peers:
            attn = _flash_peer(name, backend, interpret, Dh ** -0.5, causal)
            row[f"{name}_fwd_bwd_temp_bytes"] = _temp_bytes(_fwd_bwd(attn), (q, k, v, do))
        rows.append(row)
  device = jax.devices()[0]
  return {"suite": "attention", "backend": jax.default_backend(),
          "device_kind": device.device_kind, "jax": jax.__version__, "dtype": "bfloat16",
          "interpret": interpret, "date": time.strftime("%Y-%m-%d"), "rows": rows}


def table(result: dict) -> str:
  def fmt(x, spec=".3g"):
    return "-" if x is None else format(x, spec)

  head = (f"attention: {result['device_kind']} ({result['backend']}, jax {result['jax']}, "
          f"{result['dtype']}, {result['date']})"
          + ("  [interpreted kernels: not a speed measurement]" if result["interpret"] else ""))
  cols = ["T", "Dh", "causal", "mode", "ours", "ours_mgpu", "cudnn", "jax_pallas", "mgpu",
          "xla", "ours/cudnn", "ours/pallas", "ours/mgpu", "mgpu'/cudnn", "ours MiB", "xla MiB"]
  lines = [head, "  ".join(f"{c:>10}" for c in cols)]
  for r in result["rows"]:
    for mode in ("fwd", "fwd_bwd"):
      temps = [r.get(f"{n}_fwd_bwd_temp_bytes") if mode == "fwd_bwd" else None
               for n in ("ours", "xla")]
      cells = [str(r["seq_len"]), str(r["head_dim"]), str(r["causal"]), mode,
               fmt(r.get(f"ours_{mode}_tflops")), fmt(r.get(f"ours_mgpu_{mode}_tflops")),
               fmt(r.get(f"cudnn_{mode}_tflops")),
               fmt(r.get(f"jax_pallas_{mode}_tflops")),
               fmt(r.get(f"jax_pallas_mgpu_{mode}_tflops")), fmt(r.get(f"xla_{mode}_tflops")),
               fmt(r.get(f"ours_vs_cudnn_{mode}"), ".2f"),
               fmt(r.get(f"ours_vs_jax_pallas_{mode}"), ".2f"),
               fmt(r.get(f"ours_vs_jax_pallas_mgpu_{mode}"), ".2f"),
               fmt(r.get(f"ours_mgpu_vs_cudnn_{mode}"), ".2f"),
               *(fmt(None if t is None else t / 2**20) for t in temps)]
      lines.append("  ".join(f"{c:>10}" for c in cells))
  lines.append("TFLOP/s; ratios > 1 mean ours is faster (mgpu': ours_mgpu); MiB: compiled "
               "temporaries of fwd+bwd. Peers that did not run: see the JSON's errors.")
  return "\n".join(lines)
