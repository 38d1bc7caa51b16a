"""The preference losses (`jaxllm.train.preference.pair_losses`) against TRL's own code on the
same per-token log-probabilities (a parity test: torch and trl from the parity extra): DPO
and IPO through `trl.DPOTrainer`'s loss computation, SimPO and conservative DPO (label
smoothing) through `CPOTrainer.cpo_loss`; the mean loss and its gradient with respect to every
per-token log-probability agree within 1e-5."""

import collections
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxllm.config import PreferenceConfig  # noqa: E402
from jaxllm.train import preference  # noqa: E402

B, T = 5, 12


def _inputs(seed=0):
  """Per-token log-probs `[2B, T]` ([chosen rows; rejected rows], TRL's layout), reply masks
  of different lengths, and summed reference log-probs `[B]` each."""
  rng = np.random.default_rng(seed)
  logps = -rng.gamma(2.0, 0.6, (2 * B, T)).astype(np.float64)
  mask = np.zeros((2 * B, T), np.float64)
  for i in range(2 * B):
    start, end = rng.integers(1, 4), rng.integers(6, T + 1)
    mask[i, start:end] = 1.0
  ref = (logps * mask).sum(1) + rng.normal(0, 1.5, 2 * B)
  return logps, mask, ref[:B], ref[B:]


def _ours(logps, mask, ref_c, ref_r, cfg):
  """Mean loss and its gradient w.r.t. the per-token log-probs, by jax in float32."""
  mask = mask.astype(np.float32)
  reference = jnp.asarray(np.stack([ref_c, ref_r], axis=1), jnp.float32)
  lengths = jnp.asarray(np.stack([mask[:B].sum(1), mask[B:].sum(1)], axis=1))

  def mean_loss(tok):
    sums = (tok * mask).sum(1)
    policy = jnp.stack([sums[:B], sums[B:]], axis=1)
    return jnp.mean(preference.pair_losses(policy, reference, lengths, cfg)[0])

  loss, grad = jax.value_and_grad(mean_loss)(jnp.asarray(logps, jnp.float32))
  return float(loss), np.asarray(grad)


def _trl_dpo(logps, mask, ref_c, ref_r, loss_type, beta):
  """trl.DPOTrainer's loss on these log-probs: its loss computation run with a stand-in
  model that returns them (masked, as a model given -100 labels does)."""
  tok = torch.tensor(logps * mask, requires_grad=True)
  full_mask = torch.tensor(np.concatenate([np.zeros((2 * B, 1)), mask], 1))  # [2B, T + 1]

  def model(**kwargs):
    return types.SimpleNamespace(log_probs=tok, entropy=torch.zeros(2 * B, T),
                                 mean_logits=torch.zeros(2 * B, T),
                                 is_top1=torch.zeros(2 * B, T, dtype=torch.bool))

  accel = types.SimpleNamespace(device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x)
  fake = types.SimpleNamespace(
      model=types.SimpleNamespace(training=True), accelerator=accel, aux_loss_enabled=False,
      ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
      loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=0.0,
      use_weighting=False, _metrics={"train": collections.defaultdict(list)},
      _total_train_tokens=0, _tp_size=1)
  inputs = {"input_ids": torch.zeros(2 * B, T + 1, dtype=torch.long),
            "attention_mask": torch.ones(2 * B, T + 1, dtype=torch.long),
            "completion_mask": full_mask.long(),
            "ref_chosen_logps": torch.tensor(ref_c), "ref_rejected_logps": torch.tensor(ref_r)}
  loss = trl.DPOTrainer._compute_loss(fake, model, inputs, return_outputs=False)
  loss.backward()
  return float(loss), tok.grad.numpy() * mask


def _trl_cpo(logps, mask, ref_c, ref_r, loss_type, beta, label_smoothing, simpo_gamma):
  """trl's CPOTrainer.cpo_loss: SimPO on length-averaged log-probs; its sigmoid loss (with
  label smoothing) on the log-ratios to the reference, which is conservative DPO."""
  from trl.experimental.cpo import CPOTrainer
  tok = torch.tensor(logps, requires_grad=True)
  sums = (tok * torch.tensor(mask)).sum(1)
  if loss_type == "simpo":
    n = torch.tensor(mask.sum(1))
    chosen, rejected = (sums / n)[:B], (sums / n)[B:]
  else:
    chosen, rejected = sums[:B] - torch.tensor(ref_c), sums[B:] - torch.tensor(ref_r)
  fake = types.SimpleNamespace(alpha=0.0, loss_type=loss_type, beta=beta,
                               label_smoothing=label_smoothing, simpo_gamma=simpo_gamma,
                               accelerator=types.SimpleNamespace(device="cpu"))
  losses = CPOTrainer.cpo_loss(fake, chosen, rejected)[0]
  loss = losses.mean()
  loss.backward()
  return float(loss), tok.grad.numpy()


@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.1), ("sigmoid", 0.5), ("ipo", 0.1),
                                            ("ipo", 0.7)])
def test_dpo_and_ipo_equal_trl_dpo_trainer(loss_type, beta):
  logps, mask, ref_c, ref_r = _inputs(seed=int(beta * 10))
  ours = _ours(logps, mask, ref_c, ref_r, PreferenceConfig(loss=loss_type, beta=beta))
  theirs = _trl_dpo(logps, mask, ref_c, ref_r, loss_type, beta)
  np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ours[1], theirs[1], atol=1e-5)
  assert np.abs(theirs[1]).max() > 1e-3  # the gradient is not trivially zero


@pytest.mark.parametrize("loss_type,smoothing", [("simpo", 0.0), ("simpo", 0.1),
                                                 ("sigmoid", 0.2)])
def test_simpo_and_conservative_dpo_equal_trl_cpo_loss(loss_type, smoothing):
  logps, mask, ref_c, ref_r = _inputs(seed=3)
  cfg = PreferenceConfig(loss=loss_type, beta=2.0 if loss_type == "simpo" else 0.3,
                         label_smoothing=smoothing, simpo_gamma=0.8)
  ours = _ours(logps, mask, ref_c, ref_r, cfg)
  theirs = _trl_cpo(logps, mask, ref_c, ref_r, loss_type, cfg.beta, smoothing, cfg.simpo_gamma)
  np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ours[1], theirs[1], atol=1e-5)
  assert np.abs(theirs[1]).max() > 1e-3
