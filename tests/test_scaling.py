"""Scaling-law fits against laws with known parameters: Chinchilla's parametric form from noisy
synthetic losses, IsoFLOP minima from exact parabolas, and the `jaxllm.scaling fit` command."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from jaxllm.scaling import laws
from tests.helpers import REPO

# Hoffmann et al.'s published fit, used as the truth the synthetic losses come from.
TRUTH = laws.ParametricFit(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28, objective=0.0)


def _noisy_runs(noise=0.003, seed=0):
  """5 model sizes x 4 token budgets (2e5 .. 2e7 params, 2e6 .. 2.5e8 tokens: a CPU sweep's
  range), each loss off the law by a lognormal error of `noise` (0.3%)."""
  N = np.repeat([2e5, 6e5, 2e6, 6e6, 2e7], 4)
  D = np.tile([2e6, 1e7, 5e7, 2.5e8], 5)
  L = TRUTH.loss(N, D) * np.exp(np.random.default_rng(seed).normal(0, noise, N.shape))
  return N, D, L


def test_the_parametric_fit_recovers_a_known_law_from_noisy_losses():
  N, D, L = _noisy_runs()
  fit = laws.fit_parametric(N, D, L)
  assert abs(fit.alpha - TRUTH.alpha) < 0.02 and abs(fit.beta - TRUTH.beta) < 0.02, fit
  assert abs(fit.E - TRUTH.E) / TRUTH.E < 0.1, fit
  # the fit explains the data at least as well as the truth does (the optimum was found)
  theta = np.log([TRUTH.A, TRUTH.B, TRUTH.E]).tolist() + [TRUTH.alpha, TRUTH.beta]
  truth_objective, _ = laws._objective(np.asarray(theta), np.log(N), np.log(D), np.log(L),
                                       laws.HUBER_DELTA)
  assert fit.objective <= truth_objective
  # The bootstrap intervals hold the fit and measure the noise: 4x the noise, about 4x wider.
  widths = {"alpha": [], "beta": []}
  for noise in (0.003, 0.012):
    n_, d_, l_ = _noisy_runs(noise)
    start = fit if noise == 0.003 else laws.fit_parametric(n_, d_, l_)
    fits = laws.bootstrap_parametric(n_, d_, l_, samples=30, start=start)
    for key in ("alpha", "beta"):
      low, high = laws.interval([getattr(f, key) for f in fits])
      assert low <= getattr(start, key) <= high, (noise, key, low, high)
      widths[key].append(high - low)
  assert all(w[1] > 2 * w[0] for w in widths.values()), widths
  n, d = fit.compute_optimal(1e21)
  n_true, d_true = TRUTH.compute_optimal(1e21)
  assert abs(math.log(d / n) - math.log(d_true / n_true)) < math.log(1.5)
  assert 6 * n * d == pytest.approx(1e21)


def test_compute_optimal_split_minimises_the_law_at_its_budget():
  flops = 1e20
  n_opt, _ = TRUTH.compute_optimal(flops)
  grid = n_opt * np.geomspace(0.5, 2.0, 201)
  losses = TRUTH.loss(grid, flops / (6 * grid))
  assert grid[np.argmin(losses)] == pytest.approx(n_opt, rel=0.01)


def test_isoflop_minima_of_parabolas_are_recovered():
  N, L, C = [], [], []
  for c in (1e15, 1e16, 1e17, 1e18):
    n_star = 0.1 * c ** 0.5
    for k in np.linspace(-1.0, 1.0, 7):
      N.append(n_star * math.exp(k))
      L.append(2.0 + math.log10(1e18 / c) + 0.3 * k ** 2)
      C.append(c)
  iso = laws.fit_isoflop(N, L, C)
  np.testing.assert_allclose(iso.n_opt, [0.1 * c ** 0.5 for c in iso.budgets], rtol=1e-6)
  assert iso.a == pytest.approx(0.5, abs=1e-6) and iso.b == pytest.approx(0.5, abs=1e-6)
  np.testing.assert_allclose(iso.loss_opt, [5.0, 4.0, 3.0, 2.0], atol=1e-6)
  with pytest.raises(ValueError, match="needs at least 3"):
    laws.fit_isoflop(N[:2] + N[7:], L[:2] + L[7:], C[:2] + C[7:])


def _scaling(*args):
  return subprocess.run([sys.executable, "-m", "jaxllm.scaling", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def test_fit_command_prints_the_law_and_one_json_line(tmp_path):
  N, D, L = _noisy_runs()
  runs = tmp_path / "runs.csv"
  runs.write_text("params,tokens,loss\n" + "".join(f"{n},{d},{l}\n" for n, d, l in zip(N, D, L)))
  proc = _scaling("fit", f"--runs={runs}", "--bootstrap=0", "--flops=1e21")
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert {"alpha", "beta", "E", "A", "B", "tokens_per_param"} <= set(result)
  assert result["runs"] == 20 and abs(result["alpha"] - 0.34) < 0.02
  assert result["tokens_per_param"] == pytest.approx(result["d_opt"] / result["n_opt"])
  assert "Chinchilla 0.34" in proc.stderr and "compute-optimal at 1e+21 FLOPs" in proc.stderr
  runs.write_text("params,loss\n1,2\n")
  bad = _scaling("fit", f"--runs={runs}")
  assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == (
      f"error: --runs={runs} needs the columns params,tokens,loss (missing: tokens)")


def test_fit_command_fits_isoflop_profiles_and_draws_them(tmp_path):
  pytest.importorskip("matplotlib")  # the plots extra; CI installs it
  runs = tmp_path / "runs.csv"
  subprocess.run([sys.executable, "tools/synthetic_scaling_runs.py", str(runs)], cwd=REPO,
                 check=True, timeout=120)
  proc = _scaling("fit", f"--runs={runs}", "--bootstrap=0", f"--plots={tmp_path / 'plots'}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  # the law's own IsoFLOP exponents: beta / (alpha + beta) and alpha / (alpha + beta)
  assert result["isoflop_a"] == pytest.approx(0.28 / 0.62, abs=0.02)
  assert result["isoflop_b"] == pytest.approx(0.34 / 0.62, abs=0.02)
  for name in ("loss_vs_params.png", "isoflop.png", "frontier.png"):
    assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
