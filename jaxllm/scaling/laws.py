"""Scaling laws fitted to measured runs: Chinchilla's parametric loss and its IsoFLOP minima.

The parametric law (Hoffmann et al. 2022, approach 3):
    L(N, D) = E + A / N**alpha + B / D**beta
with N the parameters and D the training tokens, fitted as the paper does: with A = exp(a),
B = exp(b), E = exp(e), minimise the Huber loss (delta 1e-3) of
    LSE(a - alpha log N, b - beta log D, e) - log L
over the runs, by L-BFGS from a grid of starting points, keeping the best. Training compute is
C = 6 N D, and the law's compute-optimal split of a budget C is
    N_opt = G (C / 6)**(beta / (alpha + beta)),  D_opt = (C / 6)**(alpha / (alpha + beta)) / G,
    G = (alpha A / (beta B))**(1 / (alpha + beta)).
IsoFLOP profiles (approach 2): the runs of one compute budget, loss against log N, fitted by
a parabola whose minimum is that budget's optimal N; log N_opt and log D_opt against log C are
then straight lines whose slopes are the exponents a and b of N_opt ~ C**a, D_opt ~ C**b.
Intervals come from the bootstrap: the runs resampled with replacement and fitted again.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Sequence

import numpy as np
from scipy import optimize, special

HUBER_DELTA = 1e-3
# The paper's grid of initial values: alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1},
# a, b in {0, 5, ..., 25}.
START_GRID = {"a": np.arange(0.0, 30.0, 5.0), "b": np.arange(0.0, 30.0, 5.0),
              "e": np.arange(-1.0, 1.5, 0.5), "alpha": np.arange(0.0, 2.5, 0.5),
              "beta": np.arange(0.0, 2.5, 0.5)}


@dataclasses.dataclass(frozen=True)
class ParametricFit:
  """L(N, D) = E + A / N**alpha + B / D**beta."""
  E: float
  A: float
  B: float
  alpha: float
  beta: float
  objective: float  # the summed Huber loss at the optimum

  def loss(self, N, D):
    N, D = np.asarray(N, np.float64), np.asarray(D, np.float64)
    return self.E + self.A / N ** self.alpha + self.B / D ** self.beta

  def compute_optimal(self, flops: float) -> tuple[float, float]:
    """(N_opt, D_opt) for a training budget of `flops` = 6 N D."""
    s = self.alpha + self.beta
    G = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / s)
    return G * (flops / 6.0) ** (self.beta / s), (flops / 6.0) ** (self.alpha / s) / G


def _huber(residual: np.ndarray, delta: float) -> np.ndarray:
  small = np.abs(residual) <= delta
  return np.where(small, 0.5 * residual ** 2, delta * (np.abs(residual) - 0.5 * delta))


def _objective(theta: np.ndarray, log_n, log_d, log_l, delta: float) -> tuple[float, np.ndarray]:
  """The summed Huber loss of the log-space residuals, and its gradient in (a, b, e, alpha,
  beta)."""
  a, b, e, alpha, beta = theta
  terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
  lse = special.logsumexp(terms, axis=0)
  r = lse - log_l
  dh = np.clip(r, -delta, delta)  # the Huber loss's derivative in r
  w = np.exp(terms - lse)  # softmax weights: d lse / d term
  grad = np.array([np.sum(dh * w[0]), np.sum(dh * w[1]), np.sum(dh * w[2]),
                   -np.sum(dh * w[0] * log_n), -np.sum(dh * w[1] * log_d)])
  return float(np.sum(_huber(r, delta))), grad


def fit_parametric(N: Sequence[float], D: Sequence[float], L: Sequence[float], *,
                   delta: float = HUBER_DELTA, grid: dict | None = None,
                   refine: int = 32) -> ParametricFit:
  """The law fitted to runs of N parameters, D tokens and final loss L (module docstring)."""
  log_n, log_d, log_l = (np.log(np.asarray(x, np.float64)) for x in (N, D, L))
  if len(log_n) < 5:
    raise ValueError(f"the parametric law has 5 parameters: it needs at least 5 runs, not "
                     f"{len(log_n)}")
  grid = grid or START_GRID
  starts = np.asarray(list(itertools.product(*(grid[k] for k in ("a", "b", "e", "alpha",
                                                                  "beta")))), np.float64)
  # Every start's objective at once; L-BFGS from the best `refine` of them (the paper ran it
  # from all 4,500: the best few lie in the basins that matter, at a hundredth of the time).
  a, b, e, alpha, beta = (starts[:, i:i + 1] for i in range(5))
  lse = np.logaddexp(np.logaddexp(a - alpha * log_n, b - beta * log_d), e)
  initial = np.sum(_huber(lse - log_l, delta), axis=1)
  best = None
  for start in starts[np.argsort(initial)[:refine]]:
    # The objective is small (Huber of residuals ~1e-3); scipy's default tolerances, relative
    # to max(|f|, 1), would stop at the first step.
    result = optimize.minimize(_objective, start, args=(log_n, log_d, log_l, delta), jac=True,
                               method="L-BFGS-B",
                               options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 5000})
    if best is None or result.fun < best.fun:
      best = result
  a, b, e, alpha, beta = best.x
  return ParametricFit(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=float(alpha),
                       beta=float(beta), objective=float(best.fun))


def bootstrap_parametric(N, D, L, *, samples: int = 100, seed: int = 0,
                         start: ParametricFit | None = None) -> list[ParametricFit]:
  """Fits of `samples` resamplings of the runs (with replacement), each started from `start`
  alone (default: the fit of all runs), not from the whole grid; a resampling with fewer than
  5 distinct runs is left out."""
  N, D, L = (np.asarray(x, np.float64) for x in (N, D, L))
  start = start or fit_parametric(N, D, L)
  theta = np.log([start.A, start.B, start.E])
  grid = {"a": [theta[0]], "b": [theta[1]], "e": [theta[2]], "alpha": [start.alpha],
          "beta": [start.beta]}
  rng = np.random.default_rng(seed)
  fits = []
  for _ in range(samples):
    idx = rng.integers(0, len(N), len(N))
    if len(set(zip(N[idx], D[idx]))) < 5:  # too few distinct runs to determine the law
      continue
    fits.append(fit_parametric(N[idx], D[idx], L[idx], grid=grid))
  return fits


def interval(values: Sequence[float], level: float = 0.9) -> tuple[float, float]:
  """The central `level` percentile interval."""
  tail = 50.0 * (1.0 - level)
  low, high = np.percentile(np.asarray(values, np.float64), [tail, 100.0 - tail])
  return float(low), float(high)


@dataclasses.dataclass(frozen=True)
class IsoFlopFit:
  """Per budget C: the optimal N (a parabola's minimum in log N) and the fitted exponents of
  N_opt ~ C**a and D_opt ~ C**b."""
  budgets: tuple[float, ...]
  n_opt: tuple[float, ...]
  loss_opt: tuple[float, ...]
  a: float
  b: float

  def compute_optimal(self, flops: float) -> tuple[float, float]:
    log_c = np.log(np.asarray(self.budgets))
    slope, intercept = np.polyfit(log_c, np.log(self.n_opt), 1)
    n = math.exp(intercept + slope * math.log(flops))
    return n, flops / (6.0 * n)


def fit_isoflop(N: Sequence[float], L: Sequence[float], C: Sequence[float]) -> IsoFlopFit:
  """IsoFLOP minima (approach 2): runs grouped by their compute budget C (equal values), each
  group's loss fitted by a parabola in log N."""
  N, L, C = (np.asarray(x, np.float64) for x in (N, L, C))
  budgets, n_opt, loss_opt = [], [], []
  for c in sorted(set(C.tolist())):
    group = C == c
    if group.sum() < 3:
      raise ValueError(f"the IsoFLOP profile at {c:.3g} FLOPs has {int(group.sum())} runs; a "
                       "parabola needs at least 3")
    x = np.log(N[group])
    k2, k1, k0 = np.polyfit(x, L[group], 2)
    if k2 <= 0:
      raise ValueError(f"the IsoFLOP profile at {c:.3g} FLOPs has no minimum (its loss does not "
                       "curve up on both sides): widen its range of model sizes")
    x_min = -k1 / (2 * k2)
    budgets.append(c)
    n_opt.append(math.exp(x_min))
    loss_opt.append(k0 - k1 ** 2 / (4 * k2))
  if len(budgets) < 2:
    raise ValueError("IsoFLOP exponents need at least 2 compute budgets")
  log_c = np.log(budgets)
  a = float(np.polyfit(log_c, np.log(n_opt), 1)[0])
  b = float(np.polyfit(log_c, np.log(np.asarray(budgets) / (6.0 * np.asarray(n_opt))), 1)[0])
  return IsoFlopFit(tuple(budgets), tuple(n_opt), tuple(loss_opt), a, b)
