"""LoRA adapters cross the border with PEFT (a parity test: torch, transformers and peft from
the parity extra): an adapter trained here, saved in PEFT's format, loads in peft +
transformers with the same logits, and an adapter PEFT made loads here with PEFT's logits."""

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import jaxllm  # noqa: E402
from jaxllm.lora import adapters, peft_format  # noqa: E402
from tests.helpers import lora_with_updates, write_tiny_chat_model  # noqa: E402

TOKENS = [[1, 504, 3027, 42, 9, 17, 2200, 5], [7, 7, 310, 64, 1000, 12, 3, 8]]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  return write_tiny_chat_model(str(tmp_path_factory.mktemp("base")))


def _theirs(base_dir):
  return transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)


def _their_logits(model):
  with torch.no_grad():
    return model(torch.tensor(TOKENS)).logits.numpy()


def _assert_same_logits(ours, theirs):
  """Equal up to float32 rounding, which scales with the logits (this model's reach about 10:
  1.7e-4 apart at most on an AMD EPYC with AVX-512, 2026-12-07); an adapter read wrong moves
  them by more than 1e-2."""
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=3e-5 * np.abs(theirs).max())


def test_an_adapter_saved_here_loads_in_peft_with_the_same_logits(base, tmp_path):
  m = jaxllm.load(base)
  lora = lora_with_updates(m.params, adapters.LoraConfig(rank=4, alpha=8.0, rslora=True))
  peft_format.save(str(tmp_path), lora, m.config, base_model=base)
  ours = np.asarray(dataclasses.replace(m, params=lora).logits(TOKENS))
  theirs = _their_logits(peft.PeftModel.from_pretrained(_theirs(base), str(tmp_path)))
  _assert_same_logits(ours, theirs)
  # The update matters: without it the logits differ.
  assert np.abs(theirs - _their_logits(_theirs(base))).max() > 1e-2


def test_an_adapter_peft_made_loads_here_with_its_logits(base, tmp_path):
  torch.manual_seed(0)
  cfg = peft.LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,  # random b: an update
                        target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"])
  model = peft.get_peft_model(_theirs(base), cfg)
  model.save_pretrained(str(tmp_path))
  theirs = _their_logits(model)
  m = jaxllm.load(base, adapter=tmp_path)
  assert adapters.config_of(m.params) == (8, 2.0)
  _assert_same_logits(np.asarray(m.logits(TOKENS)), theirs)
