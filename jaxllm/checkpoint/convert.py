"""One entry for every checkpoint kind: read any, write HF or jaxllm-orbax.

Kinds read by `read_checkpoint(path)`:
  a training workdir or jaxllm-orbax directory  config.json with a "model" section, checkpoints/
  one of its step directories                     <dir>/checkpoints/<step>
  a Hugging Face directory                        config.json with "model_type", *.safetensors
  a GGUF file                                     *.gguf (Llama architecture)
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from jaxllm import config as config_lib
from jaxllm.checkpoint import hf_format, layouts
from jaxllm.checkpoint.errors import UnsupportedCheckpoint
from jaxllm.data import tokenizer as tokenizer_lib
from jaxllm.checkpoint import workdir as workdir_lib
from jaxllm.checkpoint.workdir import CHECKPOINT_DIR, CONFIG_FILE



@dataclasses.dataclass
class Checkpoint:
  model: config_lib.ModelConfig
  params: Any  # nested dict of arrays (numpy on the host, or jax arrays from orbax)
  tokenizer: Any
  kind: str  # "gguf" | "hf" | "jaxllm"


def _token_text(value) -> str | None:
  if isinstance(value, dict):
    return value.get("content")
  return value


def read_hf_tokenizer(path: str):
  """tokenizer.json (+ tokenizer_config.json, chat_template.jinja) or tokenizer.model."""
  config: dict[str, Any] = {}
  config_file = os.path.join(path, "tokenizer_config.json")
  if os.path.isfile(config_file):
    with open(config_file) as f:
      config = json.load(f)
  template = config.get("chat_template")
  jinja_file = os.path.join(path, "chat_template.jinja")
  if template is None and os.path.isfile(jinja_file):
    with open(jinja_file) as f:
      template = f.read()
  if os.path.isfile(os.path.join(path, "tokenizer.json")):
    from tokenizers import Tokenizer
    try:
      raw = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    except Exception as e:  # tokenizers raises plain Exception for malformed files
      raise UnsupportedCheckpoint(f"{path}/tokenizer.json is unreadable: {e}") from None
    bos, eos = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
    gen = os.path.join(path, "generation_config.json")
    ids: dict[str, Any] = {}
    if os.path.isfile(gen):
      with open(gen) as f:
        ids = json.load(f)
    bos_id = raw.token_to_id(bos) if bos else ids.get("bos_token_id")
    eos_id = raw.token_to_id(eos) if eos else ids.get("eos_token_id")
    if isinstance(eos_id, list):
      eos_id = eos_id[0]
    return tokenizer_lib.HFTokenizer(
        raw, bos_id=bos_id, eos_id=eos_id, add_bos=bool(config.get("add_bos_token", False)),
        chat_template=template)
  if os.path.isfile(os.path.join(path, "tokenizer.model")):
    return tokenizer_lib.SentencePieceTokenizer(os.path.join(path, "tokenizer.model"))
  raise UnsupportedCheckpoint(f"{path} has no tokenizer.json or tokenizer.model")


def _placer(cfg: config_lib.ModelConfig, mesh):
  """`place(path, array)` putting each converted param straight into its shards on `mesh`
  (None without a mesh: the params stay on the host)."""
  if mesh is None:
    return None
  import jax
  from jaxllm.model import transformer
  from jaxllm.parallel import placement
  from jaxllm.quant import params as quant_params
  placement.check_model(cfg, mesh)
  _, abstract = transformer.abstract_params(cfg)
  shardings = quant_params.flatten(placement.param_shardings(
      abstract, transformer.logical_axes(cfg), mesh))
  return lambda path, x: jax.device_put(x, shardings[path])


def _gguf_tokenizer(g, path: str):
  """The tokenizer a GGUF file carries (`g`: its `GGUFFile`)."""
  m = g.metadata
  try:
    tok = tokenizer_lib.tokenizer_from_gguf_vocab(
        m["tokenizer.ggml.tokens"], m["tokenizer.ggml.merges"], m["tokenizer.ggml.token_type"],
        m.get("tokenizer.ggml.pre"))
  except KeyError as e:
    raise UnsupportedCheckpoint(f"{path}: GGUF tokenizer field {e} is missing") from None
  except ValueError as e:
    raise UnsupportedCheckpoint(f"{path}: {e}") from None
  if m.get("tokenizer.ggml.model") != "gpt2":
    raise UnsupportedCheckpoint(f"{path}: GGUF tokenizer model "
                                f"{m.get('tokenizer.ggml.model')!r} is not supported (gpt2)")
  return tokenizer_lib.HFTokenizer(
      tok, bos_id=m.get("tokenizer.ggml.bos_token_id"), eos_id=m.get("tokenizer.ggml.eos_token_id"),
      pad_id=m.get("tokenizer.ggml.padding_token_id"),
      add_bos=bool(m.get("tokenizer.ggml.add_bos_token", False)), chat_template=g.chat_template())


def _gguf_checkpoint(path: str, mesh=None) -> Checkpoint:
  from jaxllm.checkpoint.gguf_format import GGUFFile
  g = GGUFFile(path)
  cfg = g.model_config()
  tokenizer = _gguf_tokenizer(g, path)
  params = layouts.params_from_hf(g.hf_state_dict(), cfg, _placer(cfg, mesh))
  return Checkpoint(cfg, params, tokenizer, "gguf")


def _hf_checkpoint(path: str, mesh=None) -> Checkpoint:
  cfg = hf_format.model_config(hf_format.read_config(path), f"{path}/config.json")
  params = layouts.params_from_hf(hf_format.read_state_dict(path), cfg, _placer(cfg, mesh))
  return Checkpoint(cfg, params, read_hf_tokenizer(path), "hf")


def _jaxllm_checkpoint(workdir: str, step: int | None, mesh=None) -> Checkpoint:
  import jax
  from jaxllm.checkpoint.orbax import Checkpointer
  from jaxllm.model import transformer
  from jaxllm.quant import params as quant_params
  cfg = workdir_lib.read_config(workdir)
  _, abstract = transformer.abstract_params(cfg.model)
  model_shapes = abstract
  spec = quant_params.QuantSpec.load(workdir)  # a quantized checkpoint (jaxllm.quantize)
  if spec is not None:
    abstract = quant_params.abstract_storage(abstract, spec)
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract)
  else:  # straight into each device's shards
    from jaxllm.parallel import placement
    placement.check_model(cfg.model, mesh)
    layouts = ({p: quant_params.LAYOUTS[p] for p in spec.quantized} if spec is not None
               else None)
    shardings = placement.param_shardings(abstract, transformer.logical_axes(cfg.model), mesh,
                                          layouts)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract, shardings)
  checkpointer = Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), read_only=True)
  try:
    params = checkpointer.restore_params(abstract, step=step)
  finally:
    checkpointer.close()
  if spec is not None:
    params = quant_params.from_storage(params, model_shapes, spec)
  return Checkpoint(cfg.model, params, read_hf_tokenizer(workdir), "jaxllm")


def read_checkpoint(path: str | os.PathLike[str], mesh=None) -> Checkpoint:
  """The checkpoint at `path`, read into host memory, or with `mesh` straight into each
  device's shards (`jaxllm.parallel.placement`): orbax restores per shard; Hugging Face and
  GGUF tensors are converted one stacked param at a time and placed at once."""
  path = os.path.abspath(os.fspath(path))
  if not os.path.exists(path):
    raise FileNotFoundError(f"no such checkpoint: {path}")
  if os.path.isfile(path):
    if path.endswith(".gguf"):
      return _gguf_checkpoint(path, mesh)
    raise UnsupportedCheckpoint(f"{path}: unsupported checkpoint file (expected .gguf or a "
                                "directory)")
  step = None
  if os.path.basename(path).isdigit() and os.path.basename(os.path.dirname(path)) == CHECKPOINT_DIR:
    step = int(os.path.basename(path))
    path = os.path.dirname(os.path.dirname(path))
  if hf_format.is_hf_dir(path):
    return _hf_checkpoint(path, mesh)
  if os.path.isfile(os.path.join(path, CONFIG_FILE)):
    return _jaxllm_checkpoint(path, step, mesh)
  raise UnsupportedCheckpoint(f"{path} is neither a jaxllm workdir, a Hugging Face directory "
                              "nor a .gguf file")


def read_model_config(path: str | os.PathLike[str]) -> config_lib.ModelConfig:
  """The ModelConfig of the checkpoint at `path` (any `read_checkpoint` reads), without
  reading its weights."""
  path = os.path.abspath(os.fspath(path))
  if os.path.isfile(path) and path.endswith(".gguf"):
    from jaxllm.checkpoint.gguf_format import GGUFFile
    return GGUFFile(path).model_config()
  if os.path.basename(path).isdigit() and os.path.basename(os.path.dirname(path)) == CHECKPOINT_DIR:
    path = os.path.dirname(os.path.dirname(path))
  if os.path.isdir(path) and hf_format.is_hf_dir(path):
    return hf_format.model_config(hf_format.read_config(path), f"{path}/config.json")
  if os.path.isfile(os.path.join(path, CONFIG_FILE)):
    return workdir_lib.read_config(path).model
  raise UnsupportedCheckpoint(f"{path} is neither a jaxllm workdir, a Hugging Face directory "
                              "nor a .gguf file")


def read_tokenizer(path: str | os.PathLike[str]):
  """The tokenizer of the checkpoint at `path` (a .gguf file, a Hugging Face directory or a
  jaxllm workdir), without reading or converting its weights."""
  path = os.path.abspath(os.fspath(path))
  if not os.path.exists(path):
    raise FileNotFoundError(f"no such checkpoint: {path}")
  if os.path.isfile(path):
    if not path.endswith(".gguf"):
      raise UnsupportedCheckpoint(f"{path}: unsupported checkpoint file (expected .gguf or a "
                                  "directory)")
    from jaxllm.checkpoint.gguf_format import GGUFFile
    return _gguf_tokenizer(GGUFFile(path), path)
  if os.path.basename(path).isdigit() and os.path.basename(os.path.dirname(path)) == CHECKPOINT_DIR:
    path = os.path.dirname(os.path.dirname(path))
  return read_hf_tokenizer(path)


def save_tokenizer(tokenizer, dst: str) -> None:
  """tokenizer.model (sentencepiece) or tokenizer.json + tokenizer_config.json into `dst`."""
  if isinstance(tokenizer, tokenizer_lib.SentencePieceTokenizer):
    tokenizer.save(os.path.join(dst, "tokenizer.model"))
    return
  tokenizer.save(os.path.join(dst, "tokenizer.json"))
  config = {"bos_token": tokenizer.piece(tokenizer.bos_id),
            "eos_token": tokenizer.piece(tokenizer.eos_id),
            "pad_token": tokenizer.piece(tokenizer.pad_id), "add_bos_token": tokenizer.add_bos,
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False}
  if tokenizer.chat_template:
    config["chat_template"] = tokenizer.chat_template
  with open(os.path.join(dst, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=2)


def export_hf(ckpt: Checkpoint, dst: str, model_type: str | None = None) -> None:
  """A transformers-loadable directory: config, float32 safetensors, tokenizer. `model_type`
  picks a family that holds the same model under another layout (`phi3` for a Llama-shaped
  model); by default the family follows from the config (`hf_format.model_type_for`)."""
  import jax
  family = hf_format.model_type_for(ckpt.model, model_type)  # refuses before anything is written
  params = jax.tree.map(np.asarray, ckpt.params)
  bos = ckpt.tokenizer.bos_id if ckpt.tokenizer.bos_id >= 0 else None
  eos = ckpt.tokenizer.eos_id if ckpt.tokenizer.eos_id >= 0 else None
  state = layouts.hf_from_params(params, ckpt.model,
                                 "mixtral" if family == "mixtral" else "qwen",
                                 fused=family == "phi3")
  hf_format.write(dst, ckpt.model, state, bos_id=bos, eos_id=eos, model_type=family)
  save_tokenizer(ckpt.tokenizer, dst)


def export_orbax(ckpt: Checkpoint, dst: str, name: str = "converted") -> None:
  """A jaxllm directory (config.json, tokenizer, checkpoints/0/params) that `load` reads."""
  import jax
  from jaxllm.checkpoint.orbax import Checkpointer
  os.makedirs(dst, exist_ok=True)
  # Only the model section matters here; train.seq_len must still fit the model to validate.
  seq_len = min(config_lib.TrainConfig.seq_len, ckpt.model.max_seq_len)
  cfg = config_lib.from_config_dict({"name": name, "model": dataclasses.asdict(ckpt.model),
                                     "train": {"seq_len": seq_len}})
  workdir_lib.write_config(dst, cfg)
  save_tokenizer(ckpt.tokenizer, dst)
  checkpointer = Checkpointer(os.path.join(dst, CHECKPOINT_DIR), keep=1)
  try:
    from jaxllm.quant import params as quant_params
    params = quant_params.to_storage(ckpt.params)  # QTensors as plain arrays
    checkpointer.save_params(0, jax.tree.map(jax.numpy.asarray, params))
  finally:
    checkpointer.close()

