"""PNG plots of a scaling fit (matplotlib, imported here only: it is not a dependency)."""

from __future__ import annotations

import os

import numpy as np


def write(directory: str, runs: dict, fit, iso=None) -> list[str]:
  """loss_vs_params.png (runs and the law per token budget), frontier.png (the law's
  compute-optimal N and D against compute, the IsoFLOP minima beside them) and, with IsoFLOP
  profiles, isoflop.png; returns the paths written."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  N, D, L = (np.asarray(runs[k], np.float64) for k in ("params", "tokens", "loss"))
  written = []

  fig, ax = plt.subplots(figsize=(6, 4))
  grid = np.geomspace(N.min() / 2, N.max() * 2, 100)
  for d in sorted(set(D.tolist())):
    at = D == d
    line = ax.plot(grid, fit.loss(grid, d), lw=1)[0]
    ax.scatter(N[at], L[at], color=line.get_color(), s=14, label=f"D = {d:.3g}")
  ax.set(xscale="log", xlabel="parameters N", ylabel="final loss",
         title=f"L = {fit.E:.3g} + {fit.A:.3g}/N^{fit.alpha:.3f} + {fit.B:.3g}/D^{fit.beta:.3f}")
  ax.legend(fontsize=7)
  written.append(_save(fig, directory, "loss_vs_params.png"))

  if iso is not None:
    C = np.asarray(runs["flops"], np.float64)
    fig, ax = plt.subplots(figsize=(6, 4))
    for c, n_opt, l_opt in zip(iso.budgets, iso.n_opt, iso.loss_opt):
      at = C == c
      line = ax.plot(N[at], L[at], "o-", ms=3, lw=1, label=f"C = {c:.3g}")[0]
      ax.plot([n_opt], [l_opt], "*", color=line.get_color(), ms=10)
    ax.set(xscale="log", xlabel="parameters N", ylabel="final loss",
           title="IsoFLOP profiles (star: the parabola's minimum)")
    ax.legend(fontsize=7)
    written.append(_save(fig, directory, "isoflop.png"))

  fig, ax = plt.subplots(figsize=(6, 4))
  budgets = np.geomspace(min((6 * N * D).min(), 1e15), 1e24, 50)
  n_opt, d_opt = zip(*(fit.compute_optimal(c) for c in budgets))
  ax.plot(budgets, n_opt, label="N_opt (law)")
  ax.plot(budgets, d_opt, label="D_opt (law)")
  if iso is not None:
    ax.scatter(iso.budgets, iso.n_opt, marker="*", label="N_opt (IsoFLOP minima)")
  ax.set(xscale="log", yscale="log", xlabel="training FLOPs (6 N D)",
         title="compute-optimal frontier")
  ax.legend(fontsize=7)
  written.append(_save(fig, directory, "frontier.png"))
  return written


def _save(fig, directory: str, name: str) -> str:
  path = os.path.join(directory, name)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  import matplotlib.pyplot as plt
  plt.close(fig)
  return path
