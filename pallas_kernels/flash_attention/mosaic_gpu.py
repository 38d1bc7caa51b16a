"""Flash attention's forward lowered through Pallas Mosaic GPU (Hopper: TMA copies into swizzled
shared memory, warpgroup matmuls); the backward is the Triton lowering's (`gpu.backward`),
which reads this forward's log-sum-exp.

A block of 128 query rows of one (batch, head) runs on three warpgroups: two compute
warpgroups of 64 rows each and a memory warpgroup (`plgpu.emit_pipeline_warp_specialized`)
that streams the kv head's key/value blocks by TMA through two shared-memory buffers, each
block read once for both. A compute warpgroup copies its queries into shared memory once,
then per key block computes S = Q K^T, the online softmax (in base 2, the scale folded into
one multiply) and O += P V, with P staged in shared memory (the GPU interpreter's `wgmma`
takes operands from shared memory only). A causal block streams only the key blocks up to its
diagonal. `block_q=64` runs one compute warpgroup.

Supported: bf16/f16, causal or full, GQA/MQA, head_dim a multiple of 64. Not here (use the
Triton lowering): segments, sliding windows, ALiBi, soft caps, float32. `supports` says which.

Interpreted on CPU through Mosaic GPU's interpreter (`plgpu.InterpretGPUParams`), which JAX
has from 0.11 on; the tests run there. Compiled only on a Hopper GPU.
"""

from __future__ import annotations

import inspect
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.flash_attention import gpu
from pallas_kernels.flash_attention.common import BlockSizes, Options

WARPGROUP_ROWS = 64  # query rows per compute warpgroup (a wgmma's M)
MEMORY_REGISTERS = 40  # per thread of the K/V-streaming warpgroup; the rest go to compute
DTYPES = (jnp.bfloat16, jnp.float16)


def _plgpu():
  try:
    from jax.experimental.pallas import mosaic_gpu as plgpu
  except ImportError as e:  # pragma: no cover - jax without Mosaic GPU
    raise NotImplementedError(f"this jax has no Mosaic GPU Pallas backend ({e})") from None
  return plgpu


def interpreter_available() -> bool:
  """Whether this jax can run Mosaic GPU kernels on CPU (`InterpretGPUParams`, jax >= 0.11)."""
  try:
    return hasattr(_plgpu(), "InterpretGPUParams")
  except NotImplementedError:
    return False


def supports(opts: Options, dtype, head_dim: int) -> str | None:
  """None when this lowering computes `opts`, else the reason it does not."""
  if jnp.dtype(dtype) not in DTYPES:
    return f"dtype {jnp.dtype(dtype).name} (bf16 or f16 only)"
  if head_dim % 64:
    return f"head_dim {head_dim} (a multiple of 64 only)"
  for name, present in (("segment ids", opts.has_segments), ("ALiBi", opts.has_alibi),
                        ("a sliding window", opts.sliding_window is not None),
                        ("a logit soft cap", opts.logit_soft_cap is not None)):
    if present:
      return name
  return None


def check_block_sizes(block_q: int, block_k: int) -> None:
  """Forward tiles: 64 or 128 query rows (one or two compute warpgroups), keys a multiple
  of 64."""
  if block_q not in (WARPGROUP_ROWS, 2 * WARPGROUP_ROWS) or block_k % 64:
    raise ValueError(f"Mosaic GPU forward tiles: block_q 64 or 128 (one or two warpgroups) "
                     f"and block_k a multiple of 64, got {block_q}, {block_k}")


def default_block_sizes(head_dim: int) -> BlockSizes:
  """Forward: 128 query rows (two compute warpgroups sharing each K/V block) by 128 keys (64
  for Dh=256, for shared memory); backward: the Triton lowering's tiles."""
  triton = BlockSizes.default("gpu", head_dim)
  return BlockSizes(block_q=2 * WARPGROUP_ROWS, block_k=64 if head_dim >= 256 else 128,
                    block_q_bwd=triton.bwd[0], block_k_bwd=triton.bwd[1],
                    num_warps=triton.num_warps, num_stages=triton.num_stages)


def _swizzled(rows_bytes: int, itemsize: int):
  """Tiling + swizzle transforms for a shared-memory tile whose rows are `rows_bytes` long."""
  plgpu = _plgpu()
  swizzle = min(128, rows_bytes)
  return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def _kernel(plgpu, *, out_type, scratch, grid, grid_names, threads, interpret):
  """`plgpu.kernel` across jax versions (0.11 names its arguments out_type/scratch_types,
  later ones out_shape/scratch_shapes); `threads` warpgroups per block, axis "wg"."""
  params = inspect.signature(plgpu.kernel).parameters
  names = (("out_type", "scratch_types") if "out_type" in params
           else ("out_shape", "scratch_shapes"))
  kwargs = {names[0]: out_type, names[1]: scratch, "grid": grid, "grid_names": grid_names,
            "num_threads": threads, "thread_name": "wg"}
  if interpret:
    kwargs["interpret"] = plgpu.InterpretGPUParams()
  return lambda body: plgpu.kernel(body, **kwargs)


def forward(q, k, v, q_seg, k_seg, slopes, *, opts: Options, bs: BlockSizes, interpret: bool):
  """q `[B, Tp, H, Dh]`, k/v `[B, Sp, K, Dh]` (padded to the blocks) -> (out `[B, Tp, H, Dh]`,
  lse `[B, H, Tp]` float32, natural log)."""
  del q_seg, k_seg, slopes  # refused by `supports`
  plgpu = _plgpu()
  if interpret and not interpreter_available():
    raise NotImplementedError("the Mosaic GPU lowering runs on CPU only in jax >= 0.11's "
                              "GPU interpreter")
  B, Tp, H, Dh = q.shape
  Sp = k.shape[1]
  bq, bk = bs.block_q, bs.block_k
  check_block_sizes(bq, bk)
  if Tp % bq or Sp % bk:
    raise ValueError(f"padded lengths T {Tp}, S {Sp} must be whole blocks ({bq}, {bk})")
  wgs = bq // WARPGROUP_ROWS  # compute warpgroups; one more streams K/V
  rows_per_wg = WARPGROUP_ROWS
  itemsize = q.dtype.itemsize
  rows = _swizzled(Dh * itemsize, itemsize)
  p_rows = _swizzled(bk * itemsize, itemsize)
  # exp(x * scale) = exp2(x * scale * log2(e)): one multiply per logit, then exp2.
  scale = opts.sm_scale * math.log2(math.e)
  mask_keys = Sp != opts.S  # padded keys exist; a causal mask hides them from real rows only
  offset = opts.offset

  def body(q_hbm, k_hbm, v_hbm, o_hbm, lse_hbm, qo_smem, p_smem, lse_smem, q_ready):
    b, h, i = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("q_blocks")
    wg = lax.axis_index("wg")
    first = i * bq + wg * rows_per_wg  # this warpgroup's first query row
    # Every warpgroup sees the same key blocks: up to the block's last row's diagonal when
    # causal (the first warpgroup's rows mask the keys past theirs).
    steps = (jnp.minimum(pl.cdiv((i + 1) * bq + offset, bk), Sp // bk) if opts.causal
             else Sp // bk)
    q_tile, p_tile, lse_tile = qo_smem.at[wg], p_smem.at[wg], lse_smem.at[wg]

    def step(index, k_tile, v_tile, carry):
      acc, m, l = carry
      j = index[0]

      def qk(s_acc):
        plgpu.wgmma(s_acc, q_tile, k_tile.transpose((1, 0)))
        return s_acc[...]
      s = pl.run_scoped(qk, plgpu.ACC((rows_per_wg, bk), jnp.float32)) * scale  # log2 units
      if opts.causal or mask_keys:
        cols = plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA) + j * bk
        visible = cols < opts.S
        if opts.causal:
          r = plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=plgpu.Layout.WGMMA)
          visible = cols <= r + (first + offset)
        # Every real row sees key 0, in the first block: m is finite after it, so masked
        # entries can be -inf (exp2 -> 0) without a NaN from (-inf) - (-inf).
        s = jnp.where(visible, s, -jnp.inf)
      m_new = jnp.maximum(m, s.max(axis=1))
      rescale = jnp.exp2(m - m_new)
      p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
      l = l * rescale + p.sum(axis=1)
      p_tile[...] = p.astype(p_tile.dtype)
      plgpu.commit_smem()  # the registers' stores, visible to the async wgmma

      def pv(o_acc):
        plgpu.wgmma(o_acc, p_tile, v_tile)
        return o_acc[...]
      pv_block = pl.run_scoped(pv, plgpu.ACC((rows_per_wg, Dh), jnp.float32))
      return acc * lax.broadcast_in_dim(rescale, acc.shape, [0]) + pv_block, m_new, l

    def compute(pipeline):  # runs in the compute warpgroups only
      plgpu.copy_gmem_to_smem(q_hbm.at[b, pl.ds(first, rows_per_wg), h], q_tile,
                              q_ready.at[wg])
      plgpu.barrier_wait(q_ready.at[wg])
      row = plgpu.Layout.WGMMA.reduce(1)
      acc, m, l = pipeline((
          plgpu.layout_cast(jnp.zeros((rows_per_wg, Dh), jnp.float32), plgpu.Layout.WGMMA),
          plgpu.layout_cast(jnp.full((rows_per_wg,), -jnp.inf, jnp.float32), row),
          plgpu.layout_cast(jnp.zeros((rows_per_wg,), jnp.float32), row)))
      q_tile[...] = (acc / lax.broadcast_in_dim(l, acc.shape, [0])).astype(q_tile.dtype)
      lse_tile[...] = (m + jnp.log2(l)) * math.log(2)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_tile, o_hbm.at[b, pl.ds(first, rows_per_wg), h])
      plgpu.copy_smem_to_gmem(lse_tile, lse_hbm.at[b, h, pl.ds(first, rows_per_wg)])
      plgpu.wait_smem_to_gmem(0)

    kv_spec = plgpu.BlockSpec((None, bk, None, Dh), lambda j: (b, j, h // opts.groups, 0),
                              transforms=rows)
    plgpu.emit_pipeline_warp_specialized(
        step, grid=(steps,), memory_registers=MEMORY_REGISTERS, in_specs=[kv_spec, kv_spec],
        max_concurrent_steps=2, wg_axis="wg", num_compute_wgs=wgs,
        compute_context=compute)(k_hbm, v_hbm)

  run = _kernel(
      plgpu,
      out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                jax.ShapeDtypeStruct((B, H, Tp), jnp.float32)),
      scratch=[plgpu.SMEM((wgs, rows_per_wg, Dh), q.dtype, transforms=rows),  # Q, then O
               plgpu.SMEM((wgs, rows_per_wg, bk), q.dtype, transforms=p_rows),
               plgpu.SMEM((wgs, rows_per_wg), jnp.float32),
               plgpu.Barrier(num_barriers=wgs)],
      grid=(B, H, Tp // bq), grid_names=("batch", "heads", "q_blocks"), threads=wgs + 1,
      interpret=interpret)
  return run(body)(q, k, v)


backward = gpu.backward
