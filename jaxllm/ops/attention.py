"""The one attention entry point used by the model.

Shapes: q `[B, T, H, Dh]`, k/v `[B, S, K, Dh]` with H a multiple of K (GQA/MQA: each group of
H/K query heads reads one K/V head; K/V are never repeated in memory).

Masking is by token index, not RoPE position, so one rule serves training and cached decoding:
query t of sequence b sits at index `q_index[b, t]` and may see key s iff
`kv_index[b, s] <= q_index[b, t]` (causal) and, when segment ids are given, both carry the same
non-padding segment. In training q_index = kv_index = arange(T); with a cache, q_index is the
slot the query's own K/V was written to and kv_index = arange(max_len). With
`sliding_window=W` a query also needs `kv_index > q_index - W` (it sees W keys, itself included).
With `alibi_slopes` `[H]` (ALiBi) head h's logits get `-slope[h] * (q_index - kv_index)`:
distances are token indices too, so cached decoding sees the same bias as the full forward.

Three entry points: `self_attention` (training, full forward: the T tokens attend to
themselves) picks an implementation by `impl`; `attention` (extending a contiguous KV cache) is
the XLA path; `paged_attention` (extending a paged KV cache) is our Pallas kernel on GPU/TPU and
a gather-then-`attention` XLA path elsewhere.

`impl`: "xla" is the plain-jnp reference below; "pallas" is our flash-attention kernel
(`pallas_kernels`, Triton on GPU, Mosaic on TPU, the interpreter on CPU); "cudnn" is
`jax.nn.dot_product_attention(implementation="cudnn")` (GPU only); "auto" is pallas on GPU/TPU
when the head size suits the kernel, else xla.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import pallas_kernels
from pallas_kernels import backends
from jaxllm.ops import ring_attention
from jaxllm.ops.attention_mask import MASK_VALUE, masked_scores
from jaxllm.parallel import rules

IMPLS = ("auto", "xla", "pallas", "cudnn")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_index: jax.Array,
              kv_index: jax.Array, q_segment_ids: jax.Array | None = None,
              kv_segment_ids: jax.Array | None = None, sliding_window: int | None = None,
              impl: str = "xla", sm_scale: float | None = None,
              alibi_slopes: jax.Array | None = None, sinks: int = 0,
              logit_soft_cap: float = 0.0) -> jax.Array:
  """Causal multi-head attention by token index (XLA); returns `[B, T, H, Dh]` in q's dtype.

  q_index `[B, T]`, kv_index `[B, S]` int32; segment ids `[B, T]` / `[B, S]` int32 (0 = padding).
  `sinks`: keys with kv_index < sinks stay visible outside the sliding window (StreamingLLM).
  `logit_soft_cap` > 0: scaled logits become cap * tanh(logits / cap) (Gemma 2).
  """
  B, T, H, Dh = q.shape
  _, S, K, _ = k.shape
  if k.shape != v.shape or k.shape[0] != B or k.shape[3] != Dh:
    raise ValueError(f"k {k.shape} and v {v.shape} must be [B={B}, S, K, Dh={Dh}]")
  if H % K:
    raise ValueError(f"query heads {H} must be a multiple of kv heads {K}")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("give both q_segment_ids and kv_segment_ids, or neither")
  del impl  # a contiguous cache has per-sequence lengths: the XLA path serves every impl
  scores = masked_scores(q, k, q_index=q_index, kv_index=kv_index, q_segment_ids=q_segment_ids,
                         kv_segment_ids=kv_segment_ids, sliding_window=sliding_window,
                         sm_scale=sm_scale, alibi_slopes=alibi_slopes, sinks=sinks,
                         logit_soft_cap=logit_soft_cap)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(B, T, H, Dh).astype(q.dtype)


def resolve_impl(impl: str, head_dim: int, platform: str | None = None) -> str:
  """The concrete implementation `impl` names on `platform` (default: the target platform,
  `pallas_kernels.backends.target_platform`)."""
  if impl not in IMPLS:
    raise ValueError(f"unknown attention impl {impl!r} (one of {', '.join(IMPLS)})")
  platform = platform or backends.target_platform()
  if impl == "auto":
    suits = head_dim in pallas_kernels.flash_attention_head_dims()
    return "pallas" if platform in ("gpu", "tpu") and suits else "xla"
  return impl


def self_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                   segment_ids: jax.Array | None = None, sliding_window: int | None = None,
                   impl: str = "auto", sm_scale: float | None = None,
                   alibi_slopes: jax.Array | None = None, index: jax.Array | None = None,
                   context_parallel: str = "all_gather",
                   load_balanced: bool = False, logit_soft_cap: float = 0.0) -> jax.Array:
  """Causal self-attention of T packed tokens: q `[B, T, H, Dh]`, k/v `[B, T, K, Dh]`.

  segment_ids `[B, T]` int32 (0 = padding) keep packed documents apart; alibi_slopes `[H]`
  float32 add ALiBi's distance penalty. Returns q's shape/dtype.

  Under a mesh with a `context` axis (context parallelism) the sequence is split over it:
  `context_parallel` "all_gather" gathers every row's keys and values to each device, "ring"
  passes them around (`jaxllm.ops.ring_attention`), masking by `index` `[B, T]` (each token's
  index in its row, or its position within its segment; default arange), so rows may come in
  any order along the sequence. `load_balanced` promises the order of
  `ring_attention.load_balance_order` (the train step's): then the ring runs the flash kernel
  (when `impl` resolves to "pallas" and `ring_runs_flash` allows). `logit_soft_cap` > 0
  caps the logits (`attention`); the cudnn impl refuses it.
  """
  B, T = q.shape[:2]
  impl = resolve_impl(impl, q.shape[-1])
  cap = logit_soft_cap
  mesh = jax.sharding.get_abstract_mesh()
  context = 1 if mesh.empty else dict(mesh.shape).get("context", 1)
  if context > 1 and context_parallel == "ring":
    if load_balanced and ring_runs_flash(impl, sliding_window, alibi_slopes is not None) and (
        not cap):
      return _ring_flash_self_attention(q, k, v, segment_ids, sm_scale, mesh)
    return _ring_self_attention(q, k, v, segment_ids, sliding_window, sm_scale, alibi_slopes,
                                index, mesh, cap)
  if context > 1:
    # Context parallelism: each device keeps its queries' slice of the sequence and gathers
    # the whole sequence's keys and values (the XLA path; the kernels see whole sequences).
    k = rules.constrain(k, ("batch", None, "kv_heads", None))
    v = rules.constrain(v, ("batch", None, "kv_heads", None))
    q = rules.constrain(q, ("batch", "length", "heads", None))
    impl = "xla"
  if impl == "pallas":
    return _pallas_self_attention(q, k, v, segment_ids, sliding_window, sm_scale, alibi_slopes,
                                  cap)
  if impl == "cudnn":
    if cap:
      raise ValueError("the cudnn attention impl has no logit soft-capping (use xla or pallas)")
    return dot_product_attention(q, k, v, segment_ids, sliding_window, sm_scale, alibi_slopes,
                                 implementation="cudnn")
  index_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  return attention(q, k, v, q_index=index_BT, kv_index=index_BT, q_segment_ids=segment_ids,
                   kv_segment_ids=segment_ids, sliding_window=sliding_window, sm_scale=sm_scale,
                   alibi_slopes=alibi_slopes, logit_soft_cap=cap)


def ring_runs_flash(impl: str, sliding_window: int | None, alibi: bool) -> bool:
  """Whether ring attention over the load-balanced order runs the flash kernel for a resolved
  `impl`: windows and ALiBi depend on distances between chunks that the kernel's blocks do not
  know, so those stay on the XLA blocks."""
  return impl == "pallas" and sliding_window is None and not alibi


def _ring_self_attention(q, k, v, segment_ids, sliding_window, sm_scale, alibi_slopes, index,
                         mesh, logit_soft_cap=0.0):
  """Ring attention inside a `shard_map` manual over `context` only (batch and heads stay with
  the automatic partitioner)."""
  B, T = q.shape[:2]
  if index is None:
    index = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  P = jax.sharding.PartitionSpec
  qkv, rows = P(None, "context", None, None), P(None, "context")

  def body(q, k, v, index, segment_ids):
    return ring_attention.ring_attention(q, k, v, q_index=index, kv_index=index,
                                         segment_ids=segment_ids, sliding_window=sliding_window,
                                         sm_scale=sm_scale, alibi_slopes=alibi_slopes,
                                         logit_soft_cap=logit_soft_cap)

  run = jax.shard_map(body, mesh=mesh, in_specs=(qkv, qkv, qkv, rows,
                                                 None if segment_ids is None else rows),
                      out_specs=qkv, axis_names={"context"}, check_vma=False)
  return run(q, k, v, index, segment_ids)


def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, lengths: jax.Array,
                    page_table: jax.Array, *, sliding_window: int | None = None,
                    impl: str = "auto", k_scales: jax.Array | None = None,
                    v_scales: jax.Array | None = None,
                    alibi_slopes: jax.Array | None = None,
                    logit_soft_cap: float = 0.0) -> jax.Array:
  """q `[B, T, H, Dh]`: the last T of each sequence's `lengths[b]` tokens, their K/V already in
  the pages `[N, P, K, Dh]` (`pallas_kernels.paged_attention` conventions; int8 pages with
  `[N, P, K]` scales; ALiBi with `[H]` slopes). Returns q's shape. Soft-capped logits take the
  XLA path (the paged kernel has no cap).
  """
  B, T, H, Dh = q.shape
  P = k_pages.shape[1]
  platform = backends.target_platform()
  impl = resolve_impl(impl, Dh, platform)
  gpu_fits = P >= 16 and not P & (P - 1)
  kernel_fits = (platform == "gpu" and gpu_fits) or (platform == "tpu" and P % 8 == 0) or (
      platform == "cpu" and gpu_fits)
  if impl == "pallas" and not logit_soft_cap and kernel_fits:
    return _pallas_paged_attention(q, k_pages, v_pages, lengths, page_table, k_scales,
                                   v_scales, sliding_window, alibi_slopes,
                                   interpret=platform == "cpu")
  # XLA: gather the sequence's pages into a contiguous view, then the index-masked path.
  M = page_table.shape[1]
  k = gather_pages(k_pages, page_table, q.dtype, k_scales)
  v = gather_pages(v_pages, page_table, q.dtype, v_scales)
  q_index = lengths[:, None] - T + jnp.arange(T, dtype=jnp.int32)[None, :]
  kv_index = jnp.broadcast_to(jnp.arange(M * P, dtype=jnp.int32), (B, M * P))
  return attention(q, k, v, q_index=q_index, kv_index=kv_index, sliding_window=sliding_window,
                   alibi_slopes=alibi_slopes, logit_soft_cap=logit_soft_cap)


def gather_pages(pages_NPKDh: jax.Array, page_table_BM: jax.Array, dtype,
                 scales_NPK: jax.Array | None = None) -> jax.Array:
  """Each sequence's pages as one contiguous view `[B, M * P, K, Dh]` in `dtype`: slot i of
  row b from page page_table_BM[b, i // P], times its scale when the pages are int8."""
  x = pages_NPKDh[page_table_BM].astype(jnp.float32 if scales_NPK is not None else dtype)
  if scales_NPK is not None:
    x = x * scales_NPK[page_table_BM][..., None]
  B, M, P = x.shape[:3]
  return x.reshape(B, M * P, *x.shape[3:]).astype(dtype)


def _pallas_paged_attention(q, k_pages, v_pages, lengths, page_table, k_scales, v_scales,
                            sliding_window, alibi_slopes, interpret):
  """The paged kernel, run per shard when a mesh is in context (on CPU in the interpreter).

  Under a serving mesh the page pools are split over KV heads on `tensor` and the query heads
  with them (each device holds whole GQA groups, `jaxllm.parallel.placement`), so each device
  attends its own heads with its own pages; page tables and lengths are whole everywhere
  (pages are shared by all rows). Every mesh axis is manual, as Mosaic requires.
  """
  def kernel(q, k_pages, v_pages, lengths, page_table, k_scales, v_scales, slopes):
    return pallas_kernels.paged_attention(q, k_pages, v_pages, lengths, page_table,
                                          k_scales=k_scales, v_scales=v_scales,
                                          sliding_window=sliding_window, alibi_slopes=slopes,
                                          interpret=interpret)

  mesh = jax.sharding.get_abstract_mesh()
  manual = set(getattr(mesh, "manual_axes", ()) or ())
  axes = set() if mesh.empty else set(mesh.axis_names) - manual
  if not axes:
    return kernel(q, k_pages, v_pages, lengths, page_table, k_scales, v_scales, alibi_slopes)
  tp = dict(mesh.shape).get("tensor", 1)
  heads = ("tensor" if tp > 1 and "tensor" not in manual and q.shape[2] % tp == 0
           and k_pages.shape[2] % tp == 0 else None)
  P = jax.sharding.PartitionSpec
  q_spec, page_spec, scale_spec = P(None, None, heads, None), P(None, None, heads, None), P(
      None, None, heads)
  in_specs = (q_spec, page_spec, page_spec, P(None), P(None, None),
              None if k_scales is None else scale_spec, None if v_scales is None else scale_spec,
              None if alibi_slopes is None else P(heads))
  run = jax.shard_map(kernel, mesh=mesh, in_specs=in_specs, out_specs=q_spec, axis_names=axes,
                      check_vma=False)
  return run(q, k_pages, v_pages, lengths, page_table, k_scales, v_scales, alibi_slopes)


def _ring_flash_self_attention(q, k, v, segment_ids, sm_scale, mesh):
  """`ring_attention.ring_flash_attention` in a `shard_map` manual over every axis, as the flash
  kernel needs (`kernel_partition`), with the sequence over `context`."""

  def body(q, k, v, segment_ids):
    return ring_attention.ring_flash_attention(q, k, v, segment_ids=segment_ids,
                                               sm_scale=sm_scale,
                                               interpret=backends.target_platform() == "cpu")

  batch_axes, head_axis, axes = kernel_partition(q, k, mesh)
  P = jax.sharding.PartitionSpec
  b = batch_axes or None
  qkv = P(b, "context", head_axis, None)
  run = jax.shard_map(body, mesh=mesh,
                      in_specs=(qkv, qkv, qkv, None if segment_ids is None else P(b, "context")),
                      out_specs=qkv, axis_names=axes | {"context"}, check_vma=False)
  return run(q, k, v, segment_ids)


def kernel_partition(q, k, mesh):
  """How a Pallas call is split under `mesh` (opaque to XLA's partitioner, it runs in a
  `shard_map`): (batch axes `tuple`, the heads' axis or None, the axes to make manual).

  The batch is split like the activations (data, fsdp, expert) and, when both head counts
  divide, the heads over `tensor` (each device then holds whole GQA groups). Manual over every
  axis not already manual: Mosaic refuses a kernel left to the automatic partitioner even along
  axes of size 1 (found compiling for TPU ahead of time); axes the specs do not name see the
  arrays whole.
  """
  sizes = {} if mesh.empty else dict(mesh.shape)
  manual = set(getattr(mesh, "manual_axes", ()) or ())
  batch_axes = () if mesh.empty else rules.batch_axes(mesh)
  batch = 1
  for a in batch_axes:
    batch *= sizes[a]
  if batch_axes and q.shape[0] % batch:
    batch_axes = ()
  tp = sizes.get("tensor", 1)
  head_axis = ("tensor" if tp > 1 and "tensor" not in manual and q.shape[2] % tp == 0
               and k.shape[2] % tp == 0 else None)
  axes = set() if mesh.empty else set(mesh.axis_names) - manual
  return batch_axes, head_axis, axes


def _pallas_self_attention(q, k, v, segment_ids, sliding_window, sm_scale, alibi_slopes,
                           logit_soft_cap=0.0):
  """The flash kernel, run per shard when a mesh is in context (`kernel_partition`)."""
  def kernel(q, k, v, segment_ids, slopes):
    # On CPU the kernel runs in the Pallas interpreter (tests, not speed).
    return pallas_kernels.flash_attention(
        q, k, v, causal=True, segment_ids=segment_ids, sliding_window=sliding_window,
        alibi_slopes=slopes, sm_scale=sm_scale, logit_soft_cap=logit_soft_cap or None,
        interpret=backends.target_platform() == "cpu")

  mesh = jax.sharding.get_abstract_mesh()
  batch_axes, head_axis, axes = kernel_partition(q, k, mesh)
  if not axes:
    return kernel(q, k, v, segment_ids, alibi_slopes)
  b = batch_axes or None
  P = jax.sharding.PartitionSpec
  qkv = P(b, None, head_axis, None)
  # Absent optional inputs (None) take a None spec.
  in_specs = (qkv, qkv, qkv, None if segment_ids is None else P(b, None),
              None if alibi_slopes is None else P(head_axis))
  run = jax.shard_map(kernel, mesh=mesh, in_specs=in_specs, out_specs=qkv, axis_names=axes,
                      check_vma=False)
  return run(q, k, v, segment_ids, alibi_slopes)


def dot_product_attention(q, k, v, segment_ids, sliding_window, sm_scale, alibi_slopes, *,
                          implementation: str | None):
  """`jax.nn.dot_product_attention` with our masking conventions (GQA is native to it); the
  "cudnn" impl, and with `implementation=None` its XLA twin (how CPU tests check it).

  ALiBi enters as an additive `[1, H, T, T]` bias in q's dtype (cuDNN's fused attention takes
  one; the flash kernel computes the same bias per tile instead of holding it).
  """
  bias = None
  if segment_ids is not None:
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, T, S]
    bias = jnp.where(same, 0.0, MASK_VALUE)[:, None]
  if alibi_slopes is not None:
    T = q.shape[1]
    index = jnp.arange(T, dtype=jnp.int32)
    distance_TS = jnp.abs(index[:, None] - index[None, :]).astype(jnp.float32)
    alibi = -jnp.asarray(alibi_slopes, jnp.float32)[None, :, None, None] * distance_TS[None, None]
    bias = alibi if bias is None else jnp.maximum(bias + alibi, MASK_VALUE)
  if bias is not None:
    bias = bias.astype(q.dtype)
  window = None if sliding_window is None else (sliding_window - 1, 0)
  return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=sm_scale, is_causal=True,
                                      local_window_size=window, implementation=implementation)
