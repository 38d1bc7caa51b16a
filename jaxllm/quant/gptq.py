"""GPTQ: quantize a weight column by column, pushing each column's rounding error onto the
columns not yet quantized, weighted by the inverse Hessian of the layer's inputs.

For a weight W `[I, O]` used as x @ W, the objective is ||X W - X Q||² over calibration inputs
X `[N, I]`; its Hessian (per output column, all alike) is H = 2 XᵀX `[I, I]`. Rows of W (input
features) are quantized in order; after row i, the remaining rows move by -err_i · H⁻¹[i, j] /
H⁻¹[i, i], which is the least-squares correction. Work goes in lazy blocks of `block` rows (the
update of later rows is one matmul per block), with the upper Cholesky factor of H⁻¹ for
stability, damping `damp · mean(diag H)` on the diagonal, and optional act-order (rows with the
largest Hessian diagonal first; the group scales are then fixed from the unquantized weight, so
the storage layout keeps contiguous groups).
"""

from __future__ import annotations

import numpy as np

from jaxllm.quant import tensor as qtensor


def hessian(x_NI: np.ndarray) -> np.ndarray:
  """2 XᵀX / N in float64: the objective's Hessian, normalised by the token count."""
  x = np.asarray(x_NI, np.float64)
  return 2.0 * x.T @ x / max(1, x.shape[0])


def column_group_params(w_OG: np.ndarray, bits: int, symmetric: bool,
                        clip_search: bool = False):
  """Scale and zero per output row for a group of columns `[O, g]` (as tensor.group_params,
  whose clip search this shares)."""
  if clip_search:
    import jax.numpy as jnp
    s, z = qtensor.group_params(jnp.asarray(w_OG.T[None], jnp.float32), bits, symmetric, True)
    return np.asarray(s[0], np.float64), None if z is None else np.asarray(z[0], np.float64)
  if symmetric:
    qmax = 127 if bits == 8 else 7
    s = np.abs(w_OG).max(axis=1) / qmax
    return np.where(s > 0, s, 1.0), None
  qmin, qmax = (-128, 127) if bits == 8 else (0, 15)
  lo, hi = np.minimum(w_OG.min(axis=1), 0.0), np.maximum(w_OG.max(axis=1), 0.0)
  s = (hi - lo) / (qmax - qmin)
  s = np.where(s > 0, s, 1.0)
  return s, np.clip(np.round(qmin - lo / s), qmin, qmax)


def quantize_column(w, s, z, bits):
  """-> (stored integers, dequantized values) of one column `[O]`."""
  if z is None:
    qmax = 127 if bits == 8 else 7
    q = np.clip(np.round(w / s), -qmax, qmax)
    return q + (8 if bits == 4 else 0), q * s
  qmin, qmax = (-128, 127) if bits == 8 else (0, 15)
  q = np.clip(np.round(w / s) + z, qmin, qmax)
  return q, (q - z) * s


def gptq_quantize(w_IO: np.ndarray, h_II: np.ndarray, *, bits: int, group_size: int,
                  symmetric: bool = True, damp: float = 0.01, block: int = 128,
                  act_order: bool = False, clip_search: bool = False):
  """-> (integers `[I, O]` in the stored range, scales `[G, O]`, zeros `[G, O]` or None)."""
  W = np.array(w_IO, np.float64).T  # [O, I]: rows are outputs, columns the quantized inputs
  n = W.shape[1]
  g = qtensor.group_size_for(n, group_size)
  G = -(-n // g)
  H = np.array(h_II, np.float64)
  dead = np.diag(H) == 0  # inputs never active: any value is exact; quantize them as zero
  H[dead, dead] = 1.0
  W[:, dead] = 0.0
  # Static group parameters (from the unquantized weight) when rows are permuted or a group
  # spans several lazy blocks; otherwise each group's parameters come from its updated rows.
  static = act_order or g > block or block % g
  scales = np.zeros((G, W.shape[0]))
  zeros = None if symmetric else np.zeros((G, W.shape[0]))
  if static:
    for i in range(G):
      s, z = column_group_params(W[:, i * g:(i + 1) * g], bits, symmetric, clip_search)
      scales[i] = s
      if zeros is not None:
        zeros[i] = z
  perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(n)
  W, H = W[:, perm], H[np.ix_(perm, perm)]
  H[np.diag_indices(n)] += damp * np.mean(np.diag(H))
  U = np.linalg.cholesky(np.linalg.inv(H)).T  # upper: H⁻¹ = Uᵀ U
  Q = np.zeros_like(W)
  for i1 in range(0, n, block):
    i2 = min(i1 + block, n)
    W1 = W[:, i1:i2].copy()
    err1 = np.zeros_like(W1)
    U1 = U[i1:i2, i1:i2]
    for i in range(i2 - i1):
      col = perm[i1 + i]
      group = col // g
      if not static and col % g == 0:
        s, z = column_group_params(W1[:, i:i + g], bits, symmetric, clip_search)
        scales[group] = s
        if zeros is not None:
          zeros[group] = z
      z = None if zeros is None else zeros[group]
      q, deq = quantize_column(W1[:, i], scales[group], z, bits)
      Q[:, i1 + i] = q
      err = (W1[:, i] - deq) / U1[i, i]
      W1[:, i:] -= np.outer(err, U1[i, i:])
      err1[:, i] = err
    W[:, i2:] -= err1 @ U[i1:i2, i2:]
  Q = Q[:, np.argsort(perm)]
  return Q.T.astype(np.int32), scales, zeros


def layer_error(x_NI: np.ndarray, w_IO: np.ndarray, w_hat_IO: np.ndarray) -> float:
  """Mean squared output error ||X W - X Ŵ||² / (N·O): what GPTQ minimises."""
  x = np.asarray(x_NI, np.float64)
  d = x @ (np.asarray(w_IO, np.float64) - np.asarray(w_hat_IO, np.float64))
  return float(np.mean(d * d))
