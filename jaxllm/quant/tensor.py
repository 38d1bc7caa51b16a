"""`QTensor`: a weight stored as int8 or packed int4 with group-wise scales (and zero points).

A weight of logical shape `[*in_axes, *out_axes]` (the model's matmuls contract the leading
axes: `[D, H, Dh]` q has one, `[H, Dh, D]` o has two) is viewed as a matrix `[I, O]`, I the
product of the contracted axes. Rows are grouped in runs of `group_size` (per-channel: one group
of all I rows; a ragged last group is padded with zero rows). Every group g and column o has a
scale s and a zero point z, and `w = (q - z) * s`:

  bits=8  q int8 in [-127, 127] (symmetric, z = 0) or [-128, 127] (asymmetric)
  bits=4  q in [0, 15] packed two per byte (z = 8 when symmetric); within each group the first
          half of the rows sit in the low nibbles and the second half in the high nibbles, so a
          kernel unpacks a group as two contiguous row blocks (no interleaving)

Leading axes beyond the weight's own (the stacked `[L]` layer axis) are batch axes carried
through every operation, so a `[L, ...]` QTensor slices per layer inside `lax.scan`.

Inside the model a QTensor stands where the float array stood: `w[...]` returns it and
`w[...].astype(dtype)` dequantizes, so every matmul of `jaxllm.model` takes quantized weights
unchanged, dequantizing inside the jitted step next to its dot.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

BITS = (4, 8)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QTensor:
  """values `[..., Ip(/2 for int4), O]` int8/uint8; scales, zeros `[..., G, O]` float32."""
  values: jax.Array
  scales: jax.Array
  zeros: jax.Array | None
  bits: int = dataclasses.field(metadata=dict(static=True))
  group_size: int = dataclasses.field(metadata=dict(static=True))
  shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))  # per-weight logical
  in_axes: int = dataclasses.field(metadata=dict(static=True))  # leading contracted axes

  # --- the float array's interface, as the model uses it ---------------------------------
  def __getitem__(self, key):
    if key is Ellipsis:
      return self
    raise TypeError("a QTensor supports only [...]; dequantize() it to index")

  def astype(self, dtype) -> jax.Array:
    return self.dequantize(dtype)

  @property
  def ndim(self) -> int:
    return self.values.ndim - 2 + len(self.shape)

  @property
  def dtype(self):
    return jnp.dtype(jnp.float32)  # what dequantize() gives by default

  # --- geometry ------------------------------------------------------------------------
  @property
  def rows(self) -> int:
    return math.prod(self.shape[:self.in_axes])

  @property
  def cols(self) -> int:
    return math.prod(self.shape[self.in_axes:])

  @property
  def num_groups(self) -> int:
    return self.scales.shape[-2]

  @property
  def nbytes(self) -> int:
    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize
               for a in (self.values, self.scales, self.zeros) if a is not None)

  def int_values(self) -> jax.Array:
    """The integers q `[..., Ip, O]` (int32), unpacked."""
    if self.bits == 8:
      return self.values.astype(jnp.int32)
    return unpack_int4(self.values, self.group_size)

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    """The float weight `[..., *shape]`."""
    batch = self.values.shape[:-2]
    q = self.int_values().astype(jnp.float32)
    G, g = self.num_groups, self.group_size
    q = q.reshape(*batch, G, g, self.cols)
    zeros = self.zeros if self.zeros is not None else jnp.float32(8 if self.bits == 4 else 0)
    if self.zeros is not None:
      zeros = zeros[..., None, :]
    w = (q - zeros) * self.scales[..., None, :]
    w = w.reshape(*batch, G * g, self.cols)[..., :self.rows, :]
    return w.reshape(*batch, *self.shape).astype(dtype)


def group_size_for(rows: int, group_size: int) -> int:
  """0 (per-channel) means one group of all rows; int4 groups need an even size."""
  return rows if group_size in (0, None) or group_size >= rows else group_size


def _as_matrix(w: jax.Array, in_axes: int, batch_axes: int):
  shape = w.shape[batch_axes:]
  rows = math.prod(shape[:in_axes])
  return w.reshape(*w.shape[:batch_axes], rows, -1), shape


def quantize(w: jax.Array, *, bits: int, group_size: int = 0, symmetric: bool = True,
             in_axes: int = 1, batch_axes: int = 0, scales: jax.Array | None = None,
             zeros: jax.Array | None = None, clip_search: bool = False,
             clip_ratio: jax.Array | None = None) -> QTensor:
  """Round-to-nearest quantization of `w` `[*batch, *in, *out]`.

  Scales default to each group's range (symmetric: max|w| / qmax; asymmetric: (max - min) /
  (2^bits - 1), with an integer zero point), or with `clip_search` the clipped range of least
  squared error (`group_params`), or each group's range times `clip_ratio` `[..., G, O]` (AWQ's
  activation-aware clipping); GPTQ passes its own `scales`/`zeros`.
  """
  if bits not in BITS:
    raise ValueError(f"bits={bits} must be one of {BITS}")
  m, shape = _as_matrix(jnp.asarray(w, jnp.float32), in_axes, batch_axes)
  rows = m.shape[-2]
  g = group_size_for(rows, group_size)
  if bits == 4 and g % 2:
    raise ValueError(f"int4 group size {g} must be even")
  G = -(-rows // g)
  m = jnp.pad(m, [(0, 0)] * (m.ndim - 2) + [(0, G * g - rows), (0, 0)])
  grouped = m.reshape(*m.shape[:-2], G, g, m.shape[-1])
  if scales is None and clip_ratio is not None:
    scales, zeros = group_params(grouped * clip_ratio[..., None, :], bits, symmetric)
  elif scales is None:
    scales, zeros = group_params(grouped, bits, symmetric, clip_search)
  q = quantize_values(grouped, scales, zeros, bits).reshape(m.shape)
  if bits == 8:
    values = q.astype(jnp.int8)
  else:
    values = pack_int4(q, g)
  return QTensor(values, scales, zeros, bits, g, tuple(shape), in_axes)


def from_integers(q: np.ndarray, scales, zeros, *, bits: int, group_size: int,
                  shape: tuple[int, ...], in_axes: int) -> QTensor:
  """A QTensor from integers already chosen (GPTQ): q `[I, O]` in the stored range
  (int8: signed; int4: [0, 15]), scales/zeros `[G, O]`."""
  q = np.asarray(q)
  rows = q.shape[0]
  G = scales.shape[0]
  q = np.pad(q, ((0, G * group_size - rows), (0, 0)),
             constant_values=0 if bits == 8 or zeros is not None else 8)
  values = (jnp.asarray(q, jnp.int8) if bits == 8 else pack_int4(jnp.asarray(q), group_size))
  return QTensor(values, jnp.asarray(scales, jnp.float32),
                 None if zeros is None else jnp.asarray(zeros, jnp.float32), bits, group_size,
                 tuple(shape), in_axes)


CLIP_GRID = tuple(1.0 - 0.025 * i for i in range(21))  # range shrink factors 1.0 .. 0.5


def group_params(grouped: jax.Array, bits: int, symmetric: bool, clip_search: bool = False):
  """(scales, zeros) `[..., G, O]` from weights `[..., G, g, O]` (zeros None when symmetric).

  By default each group's range is its full min/max. With `clip_search` the range is shrunk by
  the factor of `CLIP_GRID` that minimises the group's squared rounding error, per group and
  column: clipping a few outliers buys a finer step for all the other weights.
  """
  if clip_search:
    best = None
    for shrink in CLIP_GRID:
      scales, zeros = group_params(grouped * shrink, bits, symmetric)
      q = quantize_values(grouped, scales, zeros, bits).astype(jnp.float32)
      zero = zeros[..., None, :] if zeros is not None else (8.0 if bits == 4 else 0.0)
      err = jnp.sum(((q - zero) * scales[..., None, :] - grouped) ** 2, axis=-2)
      if best is None:
        best = (err, scales, zeros)
      else:
        better = err < best[0]
        best = (jnp.where(better, err, best[0]), jnp.where(better, scales, best[1]),
                None if zeros is None else jnp.where(better, zeros, best[2]))
    return best[1], best[2]
  if symmetric:
    qmax = 127 if bits == 8 else 7
    scales = jnp.max(jnp.abs(grouped), axis=-2) / qmax
    return jnp.where(scales > 0, scales, 1.0), None
  qmin, qmax = (-128, 127) if bits == 8 else (0, 15)
  lo = jnp.minimum(jnp.min(grouped, axis=-2), 0.0)
  hi = jnp.maximum(jnp.max(grouped, axis=-2), 0.0)
  scales = (hi - lo) / (qmax - qmin)
  scales = jnp.where(scales > 0, scales, 1.0)
  zeros = jnp.clip(jnp.round(qmin - lo / scales), qmin, qmax)
  return scales, zeros


def quantize_values(grouped, scales, zeros, bits):
  """Integers q `[..., G, g, O]` for weights `[..., G, g, O]` (the stored range, unpacked)."""
  if zeros is None:
    qmax = 127 if bits == 8 else 7
    q = jnp.clip(jnp.round(grouped / scales[..., None, :]), -qmax, qmax)
    return (q + (8 if bits == 4 else 0)).astype(jnp.int32)
  qmin, qmax = (-128, 127) if bits == 8 else (0, 15)
  q = jnp.round(grouped / scales[..., None, :]) + zeros[..., None, :]
  return jnp.clip(q, qmin, qmax).astype(jnp.int32)


def pack_int4(q: jax.Array, group_size: int) -> jax.Array:
  """q `[..., Ip, O]` in [0, 15] -> uint8 `[..., Ip / 2, O]`: each group's first half of rows in
  the low nibbles, its second half in the high nibbles."""
  *batch, rows, cols = q.shape
  g = group_size
  grouped = q.reshape(*batch, rows // g, 2, g // 2, cols).astype(jnp.uint8)
  packed = grouped[..., 0, :, :] | (grouped[..., 1, :, :] << 4)
  return packed.reshape(*batch, rows // 2, cols)


def unpack_int4(packed: jax.Array, group_size: int) -> jax.Array:
  """Inverse of `pack_int4`: uint8 `[..., Ip / 2, O]` -> int32 `[..., Ip, O]` in [0, 15]."""
  *batch, half_rows, cols = packed.shape
  h = group_size // 2
  grouped = packed.reshape(*batch, half_rows // h, 1, h, cols)
  low, high = grouped & 0xF, grouped >> 4
  return jnp.concatenate([low, high], axis=-3).reshape(*batch, 2 * half_rows, cols).astype(
      jnp.int32)


def is_qtensor(x) -> bool:
  return isinstance(x, QTensor)


def take(q: QTensor, ids: jax.Array, dtype=jnp.float32) -> jax.Array:
  """The float weights `[len(ids), *shape]` of entries `ids` along q's first batch axis (the
  experts of a `[E, ...]` QTensor): only those entries are read and dequantized."""
  pick = lambda a: None if a is None else a[ids]
  return dataclasses.replace(q, values=pick(q.values), scales=pick(q.scales),
                             zeros=pick(q.zeros)).dequantize(dtype)


def tree_nbytes(tree) -> int:
  """Bytes of every array in a params tree, QTensors counted as stored."""
  leaves = jax.tree.leaves(tree, is_leaf=is_qtensor)
  return sum(x.nbytes if is_qtensor(x) else int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x in leaves)
