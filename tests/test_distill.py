"""Knowledge distillation: the loss and its gradient against numpy, the student's start from
teacher layers, a distilled run that resumes bitwise, refusals, the CLI and the student as a
speculative draft of its teacher."""

import dataclasses
import json
import os
import signal
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxllm
from jaxllm import config as config_lib
from jaxllm.model import transformer
from jaxllm.train import distill, loop, losses
from jaxllm.train.workdir import METRICS_FILE
from tests.helpers import REPO, tiny_experiment


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _reference(s, t, w, temperature, top_k):
  """numpy: T² Σ w KL(p || q) and its gradient in the student's logits."""
  q = _softmax(s / temperature)
  if top_k:
    idx = np.argsort(-t, axis=-1, kind="stable")[..., :top_k]
    p = np.zeros_like(t)
    np.put_along_axis(p, idx, _softmax(np.take_along_axis(t, idx, -1) / temperature), -1)
  else:
    p = _softmax(t / temperature)
  with np.errstate(divide="ignore", invalid="ignore"):
    kl = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0).sum(-1)
  # d/ds of -T² Σ p log q = T (q Σp - p), and Σp = 1 (top-k renormalised too).
  grad = temperature * (q - p) * w[..., None]
  return temperature ** 2 * (kl * w).sum(), grad


class DistillationLossTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_loss_and_gradient_match_numpy(self):
    rng = np.random.default_rng(0)
    s, t = rng.standard_normal((2, 2, 5, 11)) * 3
    w = (rng.random((2, 5)) > 0.3).astype(np.float64)
    for temperature, top_k in ((1.0, 0), (2.0, 0), (1.5, 4)):
      fn = self.variant(lambda s, t, w: losses.distillation_sum(s, t, w, temperature, top_k))
      want, want_grad = _reference(s, t, w, temperature, top_k)
      got = fn(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32),
               jnp.asarray(w, jnp.float32))
      np.testing.assert_allclose(got, want, rtol=1e-5)
      grad_s, grad_t = jax.grad(lambda a, b: fn(a, b, jnp.asarray(w, jnp.float32)),
                                argnums=(0, 1))(jnp.asarray(s, jnp.float32),
                                                jnp.asarray(t, jnp.float32))
      np.testing.assert_allclose(grad_s, want_grad, atol=1e-5)
      np.testing.assert_array_equal(grad_t, 0.0)  # the teacher is not trained


def _losses(workdir):
  with open(os.path.join(workdir, METRICS_FILE)) as f:
    return {r["step"]: (r["loss"], r["kd_loss"]) for r in map(json.loads, f) if "loss" in r}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("teacher"))
  loop.train(tiny_experiment(train=dict(steps=20, checkpoint_every=20)), workdir,
             progress=False)
  return workdir


def _teacher(path):
  t = jaxllm.load(path)
  return distill.Teacher(t.config, t.graphdef, t.params, t.tokenizer)


STUDENT = dict(model=dict(d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32),
               train=dict(steps=8, checkpoint_every=4, eval_every=8),
               distill=dict(temperature=2.0, alpha=0.7, top_k=16))


def test_distillation_resumes_bitwise_and_logs_both_losses(teacher_dir, tmp_path):
  cfg = tiny_experiment(**STUDENT)
  teacher = _teacher(teacher_dir)
  straight = loop.train(cfg, str(tmp_path / "straight"), progress=False, teacher=teacher)

  def preempt(step):
    if step == 5:
      signal.raise_signal(signal.SIGTERM)

  first = loop.train(cfg, str(tmp_path / "resumed"), progress=False, teacher=teacher,
                     on_step=preempt)
  resumed = loop.train(cfg, str(tmp_path / "resumed"), progress=False, teacher=teacher)
  assert first["checkpoint_step"] == 5 and resumed["step"] == 8
  want = _losses(tmp_path / "straight")
  assert _losses(tmp_path / "resumed") == want and sorted(want) == list(range(1, 9))
  assert all(kd > 0 for _, kd in want.values())
  assert want[8][1] < want[1][1]  # the student moves toward the teacher
  chex.assert_trees_all_equal(jax.device_get(resumed["params"]),
                              jax.device_get(straight["params"]))
  # The workdir carries the teacher's tokenizer: load reads the student as a model of its own.
  student = jaxllm.load(str(tmp_path / "straight"))
  text = "def f(x):\n    return x\n"
  assert student.tokenizer.encode(text) == teacher.tokenizer.encode(text)


def test_without_distillation_weight_the_step_is_plain_training(teacher_dir, tmp_path):
  cfg = tiny_experiment(**{**STUDENT, "train": dict(steps=3, checkpoint_every=3, eval_every=3),
                           "distill": dict(alpha=0.0),
                           "data": dict(tokenizer=os.path.join(teacher_dir, "tokenizer.model"))})
  plain = loop.train(cfg, str(tmp_path / "plain"), progress=False)
  distilled = loop.train(cfg, str(tmp_path / "alpha0"), progress=False,
                         teacher=_teacher(teacher_dir))
  chex.assert_trees_all_close(jax.device_get(distilled["params"]),
                              jax.device_get(plain["params"]), atol=1e-6)


def test_student_starts_from_chosen_teacher_layers_and_refusals(teacher_dir):
  teacher = _teacher(teacher_dir)
  cfg = tiny_experiment(model=dict(n_layers=2), distill=dict(init_layers="1,0"))
  params = distill.student_from_teacher(cfg.model, (1, 0), teacher)
  t = jax.device_get(teacher.params)
  np.testing.assert_array_equal(params["blocks"]["mlp"]["up"][0], t["blocks"]["mlp"]["up"][1])
  np.testing.assert_array_equal(params["blocks"]["attn"]["q"][1], t["blocks"]["attn"]["q"][0])
  np.testing.assert_array_equal(params["embed"], t["embed"])
  for overrides, message in [
      (dict(model=dict(vocab_size=512)), "must equal the teacher's 384"),
      (dict(model=dict(n_layers=1, d_model=16, head_dim=4), distill=dict(init_layers="0")),
       "model.d_model, model.head_dim must equal the teacher's"),
      (dict(model=dict(n_layers=1), distill=dict(init_layers="5")), "[5] are not layers"),
      (dict(distill=dict(top_k=1000)), "top_k=1000 exceeds")]:
    with pytest.raises(config_lib.ConfigError, match=message.replace("[", r"\[")):
      distill.check(tiny_experiment(**overrides), teacher)
  with pytest.raises(config_lib.ConfigError, match="names 3 teacher layers"):
    tiny_experiment(distill=dict(init_layers="0,1,1"))


def test_cli_distills_a_draft_the_teacher_can_use(teacher_dir, tmp_path):
  """The CLI's student drafts for its teacher without changing greedy output, and the teacher
  accepts its greedy proposals on real text (top-1 agreement) far more often than those of the
  same student undistilled (random weights)."""
  workdir = tmp_path / "draft"
  proc = subprocess.run(
      [sys.executable, "-m", "jaxllm.distill", f"--teacher={teacher_dir}",
       f"--workdir={workdir}", "--config.model.n_layers=1", "--config.train.steps=20",
       "--config.train.eval_every=20", "--config.train.batch_size=8",
       "--config.train.seq_len=32", "--config.model.vocab_size=384",
       "--config.model.d_model=32", "--config.model.n_heads=4", "--config.model.n_kv_heads=2",
       "--config.model.head_dim=8", "--config.model.d_ff=64", "--config.model.dtype=float32",
       "--config.model.max_seq_len=128", "--config.data.tokenizer_max_sentences=20000",
       "--progress=false"], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr
  summary = json.loads(proc.stdout.strip().splitlines()[-1])  # one JSON line, as every command
  assert summary["step"] == 20 and summary["checkpoint_step"] == 20
  teacher = jaxllm.load(teacher_dir)
  student = jaxllm.load(str(workdir))
  prompt = "def f(x):"
  plain = teacher.generate(prompt, max_tokens=12, temperature=0.0)
  assert teacher.generate(prompt, max_tokens=12, temperature=0.0,
                          draft=teacher.draft(str(workdir))) == plain
  with open(os.path.join(REPO, "jaxllm", "api.py")) as f:  # text none of them trained on
    ids = [[teacher.tokenizer.bos_id, *teacher.tokenizer.encode(f.read())[:120]]]
  top1 = lambda model: np.asarray(model.logits(ids)).argmax(-1)
  undistilled = dataclasses.replace(
      student, params=transformer.split(transformer.create(student.config, 1))[1])
  agree = {name: float(np.mean(top1(model) == top1(teacher)))
           for name, model in (("distilled", student), ("undistilled", undistilled))}
  assert agree["distilled"] > 0.5 and agree["distilled"] > 2 * agree["undistilled"], agree
  bad = subprocess.run([sys.executable, "-m", "jaxllm.distill", f"--teacher={teacher_dir}",
                        f"--workdir={tmp_path / 'bad'}", "--config.model.vocab_size=500",
                        "--config.train.steps=1"], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
  assert bad.returncode == 2 and "must equal the teacher's 384" in bad.stderr, bad.stderr
  assert len(bad.stderr.strip().splitlines()) == 1
