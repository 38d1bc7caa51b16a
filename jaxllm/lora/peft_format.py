"""LoRA adapters in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`, the
files `peft.PeftModel.from_pretrained` reads for a Llama-style causal LM and
`model.save_pretrained` writes.

PEFT stores per layer and module `...layers.{i}.self_attn.q_proj.lora_A.weight` `[r, in]` and
`lora_B.weight` `[out, r]` (the torch Linear layout, as the HF weights); ours stack the layers,
`a [L, *in, r]`, `b [L, r, *out]`. The scale is written as `lora_alpha = scale * r` without
rsLoRA (the same update whichever way it was trained). Phi-3's fused `qkv_proj` /
`gate_up_proj` are not separate modules in PEFT: its adapters are refused both ways.
"""

from __future__ import annotations

import json
import math
import os
import re

import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.errors import UserError
from jaxllm.lora import adapters
from jaxllm.lora.weight import LoraWeight, is_lora
from jaxllm.model import transformer
from jaxllm.quant import params as qparams

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# our target name -> PEFT's module path inside a decoder layer
MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
           "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
           "down": "mlp.down_proj"}
_NAME = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(\w+\.\w+)\.lora_([AB])"
                   r"(?:\.default)?\.weight")


class AdapterError(UserError, ValueError):
  """The adapter directory cannot be read into this model; the message says why."""


def _stack_depths(cfg: ModelConfig) -> dict[str, np.ndarray]:
  layout = transformer.layer_layout(cfg)
  out = {}
  if layout.n_dense:
    out["blocks"] = layout.dense_depths()
  if layout.groups:
    out["moe_blocks"] = layout.moe_depths()
  return out


def save(directory: str, params: dict, cfg: ModelConfig, base_model: str | None = None) -> None:
  """Writes the LoraWeights of `params` as a PEFT adapter directory."""
  from safetensors.numpy import save_file
  found = {p: w for p, w in qparams.flatten(params).items() if is_lora(w)}
  if not found:
    raise AdapterError("these params hold no LoRA adapter to save")
  depths = _stack_depths(cfg)
  ranks = {w.rank for w in found.values()}
  scales = {w.scale for w in found.values()}
  if len(ranks) > 1 or len(scales) > 1:
    raise AdapterError(f"PEFT stores one rank and alpha per adapter: found ranks "
                       f"{sorted(ranks)}, scales {sorted(scales)}")
  (r,), (scale,) = ranks, scales
  tensors, modules = {}, set()
  for path, w in found.items():
    stack, _, sub = path.partition("/")
    target = next(t for t, p in adapters.TARGETS.items() if p == sub)
    module = MODULES[target]
    modules.add(module.split(".")[1])
    a, b = np.asarray(w.a, np.float32), np.asarray(w.b, np.float32)
    for j, i in enumerate(depths[stack]):
      pre = f"base_model.model.model.layers.{i}.{module}"
      tensors[f"{pre}.lora_A.weight"] = np.ascontiguousarray(a[j].reshape(-1, r).T)
      tensors[f"{pre}.lora_B.weight"] = np.ascontiguousarray(b[j].reshape(r, -1).T)
  os.makedirs(directory, exist_ok=True)
  save_file(tensors, os.path.join(directory, WEIGHTS_FILE))
  config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": scale * r,
            "use_rslora": False, "target_modules": sorted(modules), "lora_dropout": 0.0,
            "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
            "base_model_name_or_path": base_model}
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    json.dump(config, f, indent=2)


def read_config(directory: str) -> dict:
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise AdapterError(f"{directory}: no {CONFIG_FILE} (not a PEFT/jaxllm LoRA adapter)")
  with open(path) as f:
    try:
      config = json.load(f)
    except json.JSONDecodeError as e:
      raise AdapterError(f"{path}: not JSON ({e})") from None
  if config.get("peft_type") != "LORA":
    raise AdapterError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA")
  for key, ok in (("fan_in_fan_out", False), ("use_dora", False), ("bias", "none")):
    if config.get(key, ok) not in (ok, None):
      raise AdapterError(f"{path}: {key}={config[key]!r} is not supported (only {ok!r})")
  if config.get("modules_to_save"):
    raise AdapterError(f"{path}: modules_to_save {config['modules_to_save']} is not supported")
  return config


def load(directory: str, params: dict, cfg: ModelConfig) -> dict:
  """`params` with the adapter of `directory` on the weights it targets (layers it leaves out
  get a zero update). Refuses in one line an adapter whose shapes or layers do not fit."""
  from safetensors import SafetensorError
  from safetensors.numpy import load_file
  config = read_config(directory)
  r, alpha = int(config["r"]), float(config["lora_alpha"])
  scale = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
  try:
    tensors = load_file(os.path.join(directory, WEIGHTS_FILE))
  except (FileNotFoundError, SafetensorError) as e:
    raise AdapterError(f"{directory}: cannot read {WEIGHTS_FILE} ({e})") from None
  module_target = {m: t for t, m in MODULES.items()}
  layer_of = {int(i): (stack, j) for stack, ds in _stack_depths(cfg).items()
              for j, i in enumerate(ds)}
  flat = qparams.flatten(params)
  pieces: dict[str, dict[str, dict[int, np.ndarray]]] = {}
  for name, value in tensors.items():
    m = _NAME.fullmatch(name)
    if not m or m.group(2) not in module_target:
      raise AdapterError(f"{directory}: tensor {name} is not a LoRA weight of a module jaxllm "
                         f"adapts ({', '.join(MODULES.values())})")
    layer, module, which = int(m.group(1)), m.group(2), m.group(3)
    if layer not in layer_of:
      raise AdapterError(f"{directory}: {name} is for layer {layer}; the model has "
                         f"{cfg.n_layers}")
    stack, j = layer_of[layer]
    path = f"{stack}/{adapters.TARGETS[module_target[module]]}"
    if path not in flat:
      raise AdapterError(f"{directory}: {name} targets {path}, which this model lacks")
    pieces.setdefault(path, {"A": {}, "B": {}})[which][j] = value
  if not pieces:
    raise AdapterError(f"{directory}: {WEIGHTS_FILE} holds no LoRA weight")
  for path, ab in pieces.items():
    w = flat[path]
    try:
      in_axes, lead, fan_in, fan_out = adapters.dims(path, w)
    except ValueError as e:
      raise AdapterError(str(e)) from None
    a = np.zeros((*lead, *fan_in, r), np.float32)
    b = np.zeros((*lead, r, *fan_out), np.float32)
    for j, value in ab["A"].items():
      if value.shape != (r, math.prod(fan_in)):
        raise AdapterError(f"{directory}: {path} layer {j} lora_A is {value.shape}, this model "
                           f"wants {(r, math.prod(fan_in))} (an adapter for another base model?)")
      a[j] = value.T.reshape(*fan_in, r)
    for j, value in ab["B"].items():
      if value.shape != (math.prod(fan_out), r):
        raise AdapterError(f"{directory}: {path} layer {j} lora_B is {value.shape}, this model "
                           f"wants {(math.prod(fan_out), r)} (an adapter for another base model?)")
      b[j] = value.T.reshape(r, *fan_out)
    if set(ab["A"]) != set(ab["B"]):
      raise AdapterError(f"{directory}: {path} has lora_A and lora_B for different layers")
    flat[path] = LoraWeight(w, jnp.asarray(a), jnp.asarray(b), scale, in_axes)
  return qparams.unflatten(flat)
