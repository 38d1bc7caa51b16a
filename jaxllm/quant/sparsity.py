"""Pruning one weight matrix: magnitude, Wanda and SparseGPT, unstructured or N:M.

A weight W `[I, O]` is used as x @ W; every method prunes each output column on its own (the
same count of inputs in every column, or N of every M consecutive inputs), so the requested
sparsity or pattern holds exactly per output:
  magnitude  the smallest |W_io|;
  wanda      the smallest |W_io| * ||X_i|| (Sun et al. 2023; ||X_i||² = N · H_ii / 2 from the
             GPTQ Hessian H = 2 XᵀX / N that calibration already computes);
  sparsegpt  Frantar & Alistarh 2023: inputs are visited in order in blocks of `block`; at a
             block's start (N:M: at each M-group's start) each output prunes the inputs of
             least W_io² / [H⁻¹]_ii², and as each input is pruned (or, with `bits`, quantized)
             its error is pushed onto the inputs not yet visited through the upper Cholesky
             factor of H⁻¹, as GPTQ does, which minimises ||X W - X Ŵ||² under the mask.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxllm.quant import gptq
from jaxllm.quant import tensor as qtensor


@dataclasses.dataclass(frozen=True)
class Target:
  """What to prune to: a fraction of each output's inputs, or N kept of every M inputs."""
  sparsity: float = 0.5
  n: int = 0  # N:M pattern when m > 0 (n weights kept per m consecutive inputs)
  m: int = 0

  def __post_init__(self):
    if self.m:
      if not 0 < self.n < self.m:
        raise ValueError(f"pattern {self.n}:{self.m} must keep 0 < N < M weights")
    elif not 0.0 <= self.sparsity < 1.0:
      raise ValueError(f"sparsity={self.sparsity} must be in [0, 1)")

  @classmethod
  def parse(cls, sparsity: float, pattern: str | None) -> "Target":
    if not pattern:
      return cls(sparsity=sparsity)
    try:
      n, m = (int(x) for x in pattern.split(":"))
    except ValueError:
      raise ValueError(f"pattern {pattern!r} is not N:M (two integers)") from None
    return cls(n=n, m=m)

  def pruned(self, count: int) -> int:
    """How many of `count` inputs an unstructured target prunes."""
    return int(round(self.sparsity * count))


def mask_from_scores(scores_IO: np.ndarray, target: Target) -> np.ndarray:
  """True where pruned: per output column the lowest-scoring inputs (ties: the earlier
  input is pruned first), or the M - N lowest of every M consecutive inputs."""
  I, O = scores_IO.shape
  if target.m:
    if I % target.m:
      raise ValueError(f"an N:M pattern needs the input size {I} divisible by M={target.m}")
    groups = scores_IO.reshape(I // target.m, target.m, O)
    order = np.argsort(groups, axis=1, kind="stable")
    mask = np.zeros_like(groups, bool)
    np.put_along_axis(mask, order[:, :target.m - target.n], True, axis=1)
    return mask.reshape(I, O)
  k = target.pruned(I)
  order = np.argsort(scores_IO, axis=0, kind="stable")
  mask = np.zeros((I, O), bool)
  np.put_along_axis(mask, order[:k], True, axis=0)
  return mask


def magnitude(w_IO: np.ndarray, target: Target) -> np.ndarray:
  """-> the pruning mask `[I, O]` of the smallest weights."""
  return mask_from_scores(np.abs(np.asarray(w_IO, np.float64)), target)


def wanda(w_IO: np.ndarray, h_II: np.ndarray, target: Target) -> np.ndarray:
  """-> the pruning mask `[I, O]` of the smallest |W| · ||X_i|| (||X_i|| from diag H)."""
  x_norm = np.sqrt(np.maximum(np.diag(np.asarray(h_II, np.float64)), 0.0))
  return mask_from_scores(np.abs(np.asarray(w_IO, np.float64)) * x_norm[:, None], target)


def sparsegpt(w_IO: np.ndarray, h_II: np.ndarray, target: Target, *, block: int = 128,
              damp: float = 0.01, bits: int = 0, group_size: int = 0,
              symmetric: bool = True):
  """SparseGPT (module docstring). -> (mask `[I, O]`, the reconstructed weight `[I, O]`
  float64 with zeros where pruned) without `bits`; with `bits` (4 or 8, joint quantization)
  -> (mask, (integers `[I, O]`, scales `[G, O]`, zeros or None)), the pruned weights stored
  as the integer of 0."""
  W = np.array(w_IO, np.float64).T  # [O, I]
  O, n = W.shape
  if target.m and block % target.m:
    raise ValueError(f"block={block} must be a multiple of M={target.m}")
  H = np.array(h_II, np.float64)
  dead = np.diag(H) == 0  # inputs never active: prune them first, at no cost
  H[dead, dead] = 1.0
  W[:, dead] = 0.0
  H[np.diag_indices(n)] += damp * np.mean(np.diag(H))
  U = np.linalg.cholesky(np.linalg.inv(H)).T  # upper: H⁻¹ = Uᵀ U
  d = np.diag(U)
  if bits:
    g = qtensor.group_size_for(n, group_size)
    if block % g and g % block:
      raise ValueError(f"group_size {g} and block {block} must divide one another")
    scales = np.zeros((-(-n // g), O))
    zeros = None if symmetric else np.zeros_like(scales)
    ints = np.zeros((O, n))
  mask = np.zeros((O, n), bool)
  for i1 in range(0, n, block):
    i2 = min(i1 + block, n)
    W1 = W[:, i1:i2].copy()
    err1 = np.zeros_like(W1)
    U1 = U[i1:i2, i1:i2]
    if not target.m:
      # Exact per-output sparsity: each block prunes its share of the running total.
      k = target.pruned(i2) - target.pruned(i1)
      score = W1 ** 2 / d[i1:i2] ** 2
      order = np.argsort(score, axis=1, kind="stable")
      np.put_along_axis(mask[:, i1:i2], order[:, :k], True, axis=1)
    for i in range(i2 - i1):
      col = i1 + i
      if target.m and i % target.m == 0:
        score = W1[:, i:i + target.m] ** 2 / d[col:col + target.m] ** 2
        order = np.argsort(score, axis=1, kind="stable")
        np.put_along_axis(mask[:, col:col + target.m], order[:, :target.m - target.n], True,
                          axis=1)
      w = W1[:, i]
      kept = np.where(mask[:, col], 0.0, w)
      if bits:
        if col % g == 0:
          s, z = gptq.column_group_params(W1[:, i:i + g] if g <= block else W[:, col:col + g],
                                          bits, symmetric)
          scales[col // g] = s
          if zeros is not None:
            zeros[col // g] = z
        z = None if zeros is None else zeros[col // g]
        # A pruned weight (0) rounds to the integer of 0, which dequantizes to exactly 0.
        ints[:, col], kept = gptq.quantize_column(kept, scales[col // g], z, bits)
      W[:, col] = kept
      err = (w - kept) / U1[i, i]
      W1[:, i:] -= np.outer(err, U1[i, i:])
      err1[:, i] = err
    W[:, i2:] -= err1 @ U[i1:i2, i2:]
  if bits:
    return mask.T, (ints.T.astype(np.int32), scales, zeros)
  return mask.T, W.T
