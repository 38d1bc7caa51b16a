"""GRPO's loss (`jaxllm.rl.losses`) against TRL's own code on the same per-token
log-probabilities (a parity test: torch and trl from the parity extra):
`trl.GRPOTrainer._compute_loss` run with a stand-in model that returns them, for the grpo,
bnpo (our "token") and dr_grpo aggregations, with clip-higher and the KL term; the loss and
its gradient with respect to every per-token log-probability agree within 1e-5."""

import collections
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxllm.rl import losses  # noqa: E402

N, T, P = 6, 9, 3  # completions, completion length, prompt length


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  mask = np.zeros((N, T))
  for i in range(N):
    mask[i, :rng.integers(2, T + 1)] = 1.0  # completions of different lengths, right-padded
  old = -rng.gamma(2.0, 0.5, (N, T))
  logp = old + rng.normal(0, 0.3, (N, T))  # ratios inside and outside the clip range
  ref = old + rng.normal(0, 0.2, (N, T))
  adv = rng.normal(size=N)
  return logp, old, ref, adv, mask


def _ours(logp, old, ref, adv, mask, loss_type, eps_low, eps_high, beta):
  ours_type = {"bnpo": "token"}.get(loss_type, loss_type)
  f32 = lambda x: jnp.asarray(x, jnp.float32)

  def loss(lp):
    per_token, _ = losses.clipped_token_losses(lp, f32(old), f32(ref),
                                               f32(adv[:, None] * mask), eps_low, eps_high, beta)
    total, weight = losses.aggregate(per_token, f32(mask), ours_type, T)
    return total / weight

  value, grad = jax.value_and_grad(loss)(f32(logp))
  return float(value), np.asarray(grad) * mask


def _trl(logp, old, ref, adv, mask, loss_type, eps_low, eps_high, beta):
  lp = torch.tensor(logp, requires_grad=True)
  fake = types.SimpleNamespace(
      _get_per_token_logps_and_entropies=lambda *a, **k: (lp, torch.zeros(N, T), None),
      top_entropy_quantile=1.0, off_policy_mask_threshold=None,
      importance_sampling_level="token", beta=beta, loss_type=loss_type,
      epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=False,
      args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None),
      model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
      max_completion_length=T, _entropy_bonus_enabled=False, aux_loss_enabled=False,
      accelerator=types.SimpleNamespace(
          gather=lambda x: x, gather_for_metrics=lambda x: x, num_processes=1,
          reduce=lambda x, reduction="sum": x),
      _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)})
  inputs = {"prompt_ids": torch.zeros(N, P, dtype=torch.long),
            "prompt_mask": torch.ones(N, P, dtype=torch.long),
            "completion_ids": torch.zeros(N, T, dtype=torch.long),
            "completion_mask": torch.tensor(mask, dtype=torch.long),
            "advantages": torch.tensor(adv), "old_per_token_logps": torch.tensor(old),
            "ref_per_token_logps": torch.tensor(ref)}
  loss = trl.GRPOTrainer._compute_loss(fake, None, inputs)
  loss.backward()
  return float(loss), lp.grad.numpy() * mask


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
def test_grpo_loss_and_gradient_equal_trl(loss_type):
  args = (*_inputs(), loss_type, 0.2, 0.28, 0.04)
  ours, ours_grad = _ours(*args)
  theirs, their_grad = _trl(*args)
  assert ours == pytest.approx(theirs, abs=1e-5)
  np.testing.assert_allclose(ours_grad, their_grad, atol=1e-5)
