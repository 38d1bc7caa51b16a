"""Typed, validated experiment configs.

Experiment files in `experiments/` return an `ml_collections.ConfigDict` from `get_config()`;
`from_config_dict` turns it into frozen dataclasses, one per concern, and checks every
constraint that can be checked before anything is compiled. A failed check raises
`ConfigError` whose message names the offending key; the CLIs print it as one line.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping

import ml_collections

from jaxllm.errors import UserError

# Storage of KV caches (contiguous and paged): int8 keeps a float32 scale per token and head.
KV_CACHE_DTYPES = ("float32", "bfloat16", "int8")


class ConfigError(UserError, ValueError):
  """An invalid configuration; the message names the key and the reason."""


# offload_dots: the matmul outputs the backward needs are saved in host memory (GPU/TPU).
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "offload_dots")
ROPE_SCALINGS = ("none", "linear", "llama3", "ntk", "dynamic", "yarn")
POSITION_ENCODINGS = ("rope", "alibi")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("auto", "xla", "pallas", "cudnn")
ROUTERS = ("softmax", "sigmoid")
MOE_IMPLS = ("auto", "xla", "tiled", "pallas")
CONTEXT_PARALLEL = ("all_gather", "ring")
PACKINGS = ("concat", "best_fit")
DATA_ORDERS = ("shuffle", "difficulty")
# What reading text does with a file or JSONL record that is not UTF-8 (`jaxllm.data.corpus`).
UNDECODABLE = ("skip", "replace")
NORM_PLACEMENTS = ("pre", "post", "sandwich")
MLP_ACTIVATIONS = ("silu", "gelu_tanh")
# ZeRO over the data axis (`jaxllm.parallel.zero`): 0 off, 1 optimizer state, 2 and gradients.
# Stage 3 (parameters too) is FSDP: mesh.fsdp.
ZERO_STAGES = (0, 1, 2)
PIPELINE_SCHEDULES = ("auto", "gpipe", "circular", "1f1b")
# "auto": dynamic loss scaling when model.dtype is float16, none otherwise.
LOSS_SCALINGS = ("auto", "dynamic", "none")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Llama-style decoder. Shapes: V vocab, D d_model, H heads, K kv heads, Dh head_dim, F d_ff."""
  vocab_size: int = 2048  # token ids (a tokenizer of this many pieces)
  d_model: int = 256  # width of the residual stream
  n_layers: int = 4  # transformer blocks
  n_heads: int = 4  # query heads
  n_kv_heads: int = 2  # key/value heads (GQA; = n_heads: MHA, 1: MQA)
  head_dim: int = 64  # width of each head
  d_ff: int = 768  # hidden width of the gated MLP
  max_seq_len: int = 2048  # the longest context the model serves (KV caches, RoPE tables)
  # "rope": rotary embeddings of q and k; "alibi": no position embedding, a per-head linear
  # distance penalty on the attention logits (Press et al., 2022).
  position_encoding: str = "rope"
  rope_theta: float = 10_000.0  # RoPE base
  # Context extension (`jaxllm.model.positions`): "none"; "linear" (positions / factor);
  # "llama3" (Llama 3.1's wavelength-dependent scaling); "ntk" (static NTK-aware: theta grown
  # by factor^(Dh / (Dh - 2))); "dynamic" (NTK with the growth set by each sequence's length past
  # rope_original_max_len, Hugging Face's "dynamic"); "yarn" (NTK-by-parts interpolation plus
  # an attention temperature, Peng et al., 2023).
  rope_scaling: str = "none"
  rope_scaling_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  # The pre-training context that llama3, dynamic and yarn scale from.
  rope_original_max_len: int = 8192
  # YaRN: rotations per wavelength bounding the interpolated (beta_slow) and kept (beta_fast)
  # frequency bands; truncate rounds the band edges to whole dimensions (Hugging Face default);
  # attention_factor scales q and k after rotation (logits by its square); 0: 0.1 ln(factor) + 1.
  rope_yarn_beta_fast: float = 32.0
  rope_yarn_beta_slow: float = 1.0
  rope_yarn_truncate: bool = True
  rope_attention_factor: float = 0.0
  # Local attention (Mistral): a query sees the `sliding_window` keys ending at itself; 0 = off.
  sliding_window: int = 0
  norm_eps: float = 1e-5  # RMSNorm epsilon
  tie_embeddings: bool = True  # the output head is the embedding table transposed
  # Master params are always `param_dtype`; matmuls run in `dtype`.
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"  # what the backward recomputes: none, full, dots, dots_no_batch, offload_dots
  # The remat policy on every N-th layer only (layers 0, N, 2N, ...); the others keep all
  # their activations: between no remat and remat on every layer. Dense, unpipelined models.
  remat_every: int = 1
  attention_impl: str = "auto"  # xla, pallas (flash kernel), cudnn or auto (by platform)
  init_std: float = 0.02  # normal init scale of the weights
  # Attention variants: biases on the q/k/v projections (Qwen2); RMSNorm over each query and
  # key head before RoPE (Qwen3, OLMo 2).
  qkv_bias: bool = False
  qk_norm: bool = False
  # OLMo 2: one RMSNorm over all query heads together (and one over all key heads), `[H, Dh]`
  # scales, instead of one per head `[Dh]`.
  qk_norm_over_heads: bool = False
  # Where each block's norms sit: "pre" (Llama: x + f(norm(x))), "post" (OLMo 2:
  # x + norm(f(x)), the sublayer's output normalised before the residual add) or "sandwich"
  # (Gemma 2/3: x + post_norm(f(pre_norm(x)))).
  norm_placement: str = "pre"
  # Gemma: every RMSNorm scales by (norm_offset + w) (1.0: weights stored around 0, initialised
  # at 0); embeddings multiplied by sqrt(d_model); the MLP gated by GELU (tanh approximation)
  # instead of SiLU.
  norm_offset: float = 0.0
  embed_scale: bool = False
  mlp_activation: str = "silu"
  # Softmax scale 1 / sqrt(query_pre_attn_scalar) instead of 1 / sqrt(head_dim); 0: head_dim.
  query_pre_attn_scalar: float = 0.0
  # Local and global layers (Gemma 2/3): with sliding_window > 0, every `global_every`-th layer
  # (depths global_every - 1, 2 * global_every - 1, ...) attends to the whole context and the
  # others to the window only. Local layers rotate with plain RoPE of base rope_local_theta (0:
  # the global layers' RoPE, scaling included). 0: every layer alike.
  global_every: int = 0
  rope_local_theta: float = 0.0
  # Gemma 2: logits soft-capped as cap * tanh(logits / cap), the final ones and the attention
  # scores; 0 = off.
  final_logit_soft_cap: float = 0.0
  attn_logit_soft_cap: float = 0.0
  # Mixture of Experts (`jaxllm.model.moe`); n_experts = 0: every layer dense. Layer layout:
  # `first_dense_layers` dense layers, then groups of `moe_every` layers whose last is MoE
  # (Hugging Face's decoder_sparse_step), then dense layers for any remainder.
  n_experts: int = 0
  experts_per_token: int = 2  # top-k
  moe_d_ff: int = 0  # each expert's hidden width; 0: d_ff
  n_shared_experts: int = 0  # always-on experts (Qwen2-MoE, DeepSeek), one MLP of their widths
  shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(x @ w) scales the shared output
  first_dense_layers: int = 0  # dense layers before the first MoE group
  moe_every: int = 1  # layers per MoE group (its last layer is MoE)
  # "softmax": top-k of softmax(logits); "sigmoid": top-k of sigmoid(logits) (DeepSeek-V3).
  router: str = "softmax"
  norm_topk_prob: bool = False  # renormalise the k chosen weights to sum to 1 (Mixtral: yes)
  # Expert capacity per batch shard, in multiples of the balanced load (tokens * k / E); tokens
  # beyond it are dropped (GShard). 0: dropless (grouped matmuls over the sorted tokens).
  capacity_factor: float = 0.0
  # Auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores for
  # selection only, moved by this rate towards the mean load after every step. 0: off.
  router_bias_update_rate: float = 0.0
  # The experts' grouped matmul (`jaxllm.ops.moe`): "xla" (jax.lax.ragged_dot), "tiled" (XLA
  # gathers into row tiles; fast on CPU), "pallas" (our kernel, GPU) or "auto".
  moe_impl: str = "auto"

  @property
  def cache_window(self) -> int:
    """The sliding window every layer has, which bounds what a KV cache must keep (0: none, or
    some layers attend globally)."""
    return 0 if self.global_every else self.sliding_window


@dataclasses.dataclass(frozen=True)
class DataConfig:
  # Empty: the running Python's standard library `.py` files (found via sysconfig).
  paths: tuple[str, ...] = ()
  # Share of files (chosen by a hash of their path, so stable) held out for evaluation.
  eval_fraction: float = 0.05
  # Empty: train a sentencepiece model on the train split and store it in the workdir.
  tokenizer: str = ""
  tokenizer_max_sentences: int = 300_000  # lines sampled to train that tokenizer
  seed: int = 0  # the order the training data is read in
  # Named sources for a mixture, `name=path_or_glob` entries (a name may repeat to add paths;
  # `name=stdlib` is the standard library), used instead of `paths`; each is split into train
  # and held-out files by itself.
  sources: tuple[str, ...] = ()
  # Weights of the sources, `name:weight,...` (normalised; empty: equal weights): the share of
  # packed training rows each source fills (`jaxllm.data.pipeline`).
  mixture: str = ""
  # Held-out files given explicitly (paths, directories, globs): evaluation reads these, and
  # training reads every other file of `paths`/`sources` (no split by hash).
  eval_paths: tuple[str, ...] = ()
  # "concat": concatenate documents and split them into rows (no padding, documents cut at row
  # ends); "best_fit": best-fit bin packing of whole documents into rows, padding the rest (a
  # document longer than a row is first cut into row-sized pieces).
  packing: str = "concat"
  packing_bins: int = 64  # best_fit: rows filled at once (more: less padding)
  # "shuffle": documents in a random order each epoch; "difficulty": easiest first, by the
  # "difficulty" field `python -m jaxllm.data score` writes (a reference model's loss).
  order: str = "shuffle"
  # Files and JSONL records that are not UTF-8: "skip" leaves them out, "replace" keeps them
  # with each bad byte sequence as U+FFFD; either way the run says how many.
  undecodable: str = "skip"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 1000  # optimizer steps in the run
  batch_size: int = 16  # rows per step (global, over all devices)
  seq_len: int = 256  # tokens per row
  lr: float = 3e-3  # peak learning rate (AdamW), after linear warm-up
  min_lr_ratio: float = 0.1  # the cosine decay ends at lr * this
  warmup_steps: int = 50  # linear warm-up from 0 to lr
  weight_decay: float = 0.1  # AdamW's decoupled decay (matrices only)
  b1: float = 0.9  # Adam's first-moment decay
  b2: float = 0.95  # Adam's second-moment decay
  eps: float = 1e-8  # Adam's epsilon
  clip_norm: float = 1.0  # gradients clipped to this global norm (0: off)
  grad_accum: int = 1  # microbatches whose gradients are summed before one update
  z_loss: float = 0.0  # weight of the mean squared log-sum-exp of the logits
  log_every: int = 10  # steps between metrics.jsonl lines
  eval_every: int = 200  # steps between held-out evaluations (and at the end)
  eval_batches: int = 8  # held-out batches per evaluation
  checkpoint_every: int = 200  # steps between checkpoints (and at the end)
  keep_checkpoints: int = 3  # newest checkpoints kept
  seed: int = 0  # parameter init and the train state's random key
  microbatches: int = 1  # pipeline microbatches per step (mesh.stage > 1)
  pipeline_chunks: int = 1  # 1 = GPipe; v > 1 = circular schedule, v layer chunks per stage
  # Pipeline schedule under mesh.stage > 1: gpipe, circular (pipeline_chunks > 1) or 1f1b
  # (each microbatch's backward right after its forward: activation memory flat in the number
  # of microbatches); "auto" is circular when pipeline_chunks > 1, else gpipe.
  pipeline_schedule: str = "auto"
  qat_bits: int = 0  # quantization-aware training: 0 off, 8 or 4 (fake-quantized block weights)
  qat_group_size: int = 128  # rows per scale group for qat_bits (0: per channel)
  # MoE models: coefficients of the load-balancing loss (Switch/GShard: E * sum_e f_e P_e per
  # MoE layer, averaged over layers; 1 at perfect balance) and the router z-loss (mean squared
  # log-sum-exp of the router logits).
  moe_aux_loss: float = 0.01
  router_z_loss: float = 0.001
  # Context parallelism (mesh.context > 1): "all_gather" gathers every row's keys and values to
  # each device; "ring" passes them around the context ring, with the sequence reordered so that
  # causal masking leaves every device the same work.
  context_parallel: str = "all_gather"
  # Sequence-length warm-up, `length:until_step,...` (e.g. "32:100,64:300"): before step 100
  # each row of seq_len tokens is trained as seq_len/32 rows of 32 (attention within each),
  # then 64 until step 300, then seq_len. Tokens per step and the data stream are unchanged.
  seq_len_schedule: str = ""
  # float16 training (`jaxllm.train.loss_scale`): the loss is multiplied by a scale before the
  # backward pass and the gradients divided by it; a step whose gradients are not finite is
  # skipped and halves the scale, `loss_scale_period` finite steps in a row double it.
  loss_scaling: str = "auto"
  loss_scale_init: float = 2.0 ** 15
  loss_scale_period: int = 2000
  # "START,COUNT": a jax.profiler trace of steps START .. START + COUNT - 1 into the workdir's
  # tb/ (TensorBoard's profile plugin and Perfetto read it); empty: no trace.
  profile_steps: str = ""
  # The optimizer state lives in host memory (pinned_host) and visits the accelerator for each
  # step's update (GPU/TPU; `jaxllm.parallel.zero` places it).
  offload_optimizer: bool = False
  # Surviving faults (docs/training.md). Saves happen every checkpoint_every steps and, with
  # checkpoint_minutes > 0, also once that many minutes have passed since the last one.
  checkpoint_minutes: float = 0.0
  # A local tier: checkpoints also every local_checkpoint_every steps into this directory (host
  # RAM such as /dev/shm, or a local SSD; "" off), restored instead of the workdir's when newer.
  # One process only: a multi-host run's local copies are not one checkpoint.
  local_checkpoint_dir: str = ""
  local_checkpoint_every: int = 50
  # orbax writes a checkpoint in the background while the next steps run (the step waits only
  # for the copy to host memory); a save waits for the one before it to be committed.
  async_checkpoint: bool = True
  # A non-finite loss or gradient norm (or a spike, below) rolls the run back to its newest
  # checkpoint and skips the offending step's batch; after this many rollbacks in a run it stops
  # with a one-line reason (0: stop at the first, keeping the last good checkpoint).
  rollback_limit: int = 3
  # A loss above spike_loss_factor times its median over the last spike_window steps, or a
  # gradient norm above spike_grad_factor times its median, counts as a spike (0: off; only
  # non-finite values count). Gradient norms vary far more from step to step than losses.
  spike_loss_factor: float = 0.0
  spike_grad_factor: float = 0.0
  spike_window: int = 50
  # "T,U,...": the batches steps T, U, ... would train on are discarded (data known to be bad);
  # rollbacks add theirs in the workdir's skipped_batches.json.
  skip_steps: str = ""
  # A step, evaluation or save that takes longer than this many seconds (the first step's
  # compilation excepted) is reported with every thread's stack (0: off); with watchdog_exit
  # the process then exits with status 75 (EX_TEMPFAIL) for a supervisor to restart it.
  watchdog_s: float = 0.0
  watchdog_exit: bool = False
  # Multi-process runs: a process whose host time between log steps (wall time less the waits
  # for device results) is above this multiple of the other processes' median is reported as
  # a straggler (0: off).
  straggler_factor: float = 2.0


def parse_skip_steps(spec: str) -> tuple[int, ...]:
  """`"13,40"` -> (13, 40); raises ConfigError if malformed."""
  try:
    steps = tuple(int(x) for x in spec.split(",") if x.strip())
  except ValueError:
    raise ConfigError(f"train.skip_steps={spec!r} is not comma-separated step numbers") \
        from None
  if any(s < 1 for s in steps):
    raise ConfigError(f"train.skip_steps={spec!r}: steps count from 1")
  return steps


def parse_profile_steps(spec: str) -> tuple[int, int] | None:
  """`"5,3"` -> (5, 3); None for an empty spec; raises ConfigError if malformed."""
  if not spec.strip():
    return None
  try:
    start, count = (int(x) for x in spec.split(","))
  except ValueError:
    raise ConfigError(f"train.profile_steps={spec!r} is not START,COUNT (two integers)") \
        from None
  if start < 1 or count < 1:
    raise ConfigError(f"train.profile_steps={spec!r}: START and COUNT must be >= 1")
  return start, count


def loss_scaling_on(config: "Config") -> bool:
  """Whether the run scales its loss (train.loss_scaling, "auto": for float16 compute)."""
  mode = config.train.loss_scaling
  return mode == "dynamic" or (mode == "auto" and config.model.dtype == "float16")


def parse_seq_len_schedule(spec: str) -> tuple[tuple[int, int], ...]:
  """`"64:100,128:300"` -> ((64, 100), (128, 300)); raises ConfigError on a malformed entry."""
  stages = []
  for entry in (e.strip() for e in spec.split(",") if e.strip()):
    try:
      length, until = (int(x) for x in entry.split(":"))
    except ValueError:
      raise ConfigError(f"train.seq_len_schedule entry {entry!r} is not length:until_step "
                        "(two integers)") from None
    stages.append((length, until))
  return tuple(stages)


def seq_len_at(schedule: tuple[tuple[int, int], ...], seq_len: int, step: int) -> int:
  """The row length step `step` (1-based) trains at."""
  for length, until in schedule:
    if step < until:
      return length
  return seq_len


def parse_mixture(spec: str) -> dict[str, float]:
  """`"code:0.7,docs:0.3"` -> {"code": 0.7, "docs": 0.3}; raises ConfigError if malformed."""
  weights = {}
  for entry in (e.strip() for e in spec.split(",") if e.strip()):
    name, sep, value = entry.rpartition(":")
    try:
      weight = float(value)
    except ValueError:
      weight = float("nan")
    if not sep or not name or not weight > 0 or name in weights:
      raise ConfigError(f"data.mixture entry {entry!r} is not name:weight with a positive "
                        "weight and a name used once")
    weights[name] = weight
  return weights


def parse_sources(entries: tuple[str, ...]) -> dict[str, list[str]]:
  """`("code=a/*.py", "docs=b", "code=c")` -> {"code": ["a/*.py", "c"], "docs": ["b"]}."""
  sources: dict[str, list[str]] = {}
  for entry in entries:
    name, sep, path = entry.partition("=")
    if not sep or not name.strip() or not path.strip():
      raise ConfigError(f"data.sources entry {entry!r} is not name=path_or_glob")
    sources.setdefault(name.strip(), []).append(path.strip())
  return sources


def mixture_weights(data: "DataConfig") -> dict[str, float]:
  """The normalised weight of each named source (equal when data.mixture is empty)."""
  names = list(parse_sources(data.sources))
  weights = parse_mixture(data.mixture) or dict.fromkeys(names, 1.0)
  total = sum(weights.values())
  return {name: weights[name] / total for name in names}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device counts per mesh axis; -1 means all devices not used by the other axes."""
  data: int = -1  # data parallelism (replicas of the model)
  fsdp: int = 1  # params, gradients and optimizer state sharded (ZeRO-3)
  tensor: int = 1  # tensor parallelism (Megatron: heads and MLP split)
  stage: int = 1  # pipeline stages (layers split)
  expert: int = 1  # expert parallelism (MoE experts split)
  # TPU slices the devices form (multi-slice over the data-centre network): stage, then data,
  # span them (`jaxllm.parallel.mesh.make_mesh`); `plan --aot` compiles for that many slices.
  slices: int = 1
  # Megatron sequence parallelism: inside each tensor-parallel group the residual stream (and
  # so the norms and residual adds) is split over `tensor` along the sequence between blocks.
  sequence_parallel: bool = False
  # Context parallelism: the sequence of every batch row split over this many devices, in
  # training (forward and backward); attention gathers the keys and values it needs.
  context: int = 1
  # ZeRO over the data axis: 1 splits the optimizer state over mesh.data, 2 the gradients too
  # (`jaxllm.parallel.zero`); FSDP (mesh.fsdp) is stage 3 and composes with both.
  zero_stage: int = 0


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """Knowledge distillation (`python -m jaxllm.distill --teacher=PATH`); unused by plain
  training."""
  # Softmax temperature of both distributions in the distillation loss, which is scaled by T²
  # so that its gradients keep their size as T changes (Hinton et al. 2015).
  temperature: float = 1.0
  # Weight of the distillation loss (forward KL, teacher || student); 1 - alpha weighs the
  # hard-label cross-entropy.
  alpha: float = 0.5
  # 0: the teacher's whole distribution; k > 0: its k most likely tokens, renormalised.
  top_k: int = 0
  # The student starts from these teacher layers (comma-separated indices, e.g. "0,10,20,29";
  # embeddings, final norm and head copied too) instead of a random init.
  init_layers: str = ""


FINETUNE_METHODS = ("full", "lora", "qlora")
PREFERENCE_LOSSES = ("sigmoid", "ipo", "simpo")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """Fine-tuning a loaded model (`python -m jaxllm.sft`, `python -m jaxllm.dpo`)."""
  # full: every weight; lora: low-rank adapters on a frozen float base; qlora: adapters on a
  # frozen base rounded to int`lora.base_bits` (the `lora` section shapes the adapters).
  method: str = "lora"
  loss_on: str = "assistant"  # SFT: assistant (the replies / completion alone) or all tokens
  eval_fraction: float = 0.1  # examples held out (seeded) for eval loss and exact match
  # Held-out examples answered greedily before and after training, scored by exact match of the
  # reply with the reference (the chosen reply of a preference pair; 0: none).
  eval_generate: int = 16
  # The base model's settings for this run ("": the base's own): what the backward recomputes
  # (a model.remat policy; large models need "full" to fit) and the compute dtype
  # (float32 or bfloat16; the weights keep their own).
  remat: str = ""
  compute_dtype: str = ""


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """LoRA adapters of `finetune.method` lora and qlora."""
  targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")  # projections adapted
  rank: int = 16  # r: a is [in, r], b [r, out]
  alpha: float = 32.0  # the update is scaled by alpha / rank
  rslora: bool = False  # scale alpha / sqrt(rank) instead (rank-stabilised LoRA)
  # Training: each input of the adapters' path dropped with this probability (PEFT's
  # lora_dropout; the base's product sees every input). 0: none.
  dropout: float = 0.0
  # qlora: the base's block projections rounded to this many bits (4 or 8) in groups of
  # base_group_size rows (0: one scale per output channel); embedding, norms and head stay float.
  base_bits: int = 4
  base_group_size: int = 64


@dataclasses.dataclass(frozen=True)
class PreferenceConfig:
  """Preference optimisation (`python -m jaxllm.dpo`) on chosen/rejected pairs."""
  # sigmoid: DPO (Rafailov et al. 2023); ipo: IPO's squared loss on length-averaged log-ratios
  # (Azar et al. 2023); simpo: SimPO, length-averaged log-probabilities and no reference model
  # (Meng et al. 2024).
  loss: str = "sigmoid"
  beta: float = 0.1  # scale of the log-ratios (DPO's KL strength; IPO's margin is 1 / (2 beta))
  label_smoothing: float = 0.0  # sigmoid, simpo: the chance a label is flipped (cDPO)
  simpo_gamma: float = 0.5  # simpo: the target reward margin


RL_ALGORITHMS = ("grpo", "ppo")
RL_LOSS_TYPES = ("grpo", "token", "dr_grpo")
RL_REWARDS = ("exact_match", "final_number", "regex", "unit_test")
RL_ROLLOUTS = ("engine", "generate")


@dataclasses.dataclass(frozen=True)
class RlConfig:
  """Reinforcement learning (`python -m jaxllm.rl`): rollouts from the policy, rewards,
  GRPO or PPO updates (`jaxllm.rl`). `train.batch_size` is not read: a step samples
  `prompts_per_step` x `group_size` completions; `train.seq_len` bounds prompt + completion."""
  # grpo: group-normalised advantages, KL to the reference in the loss, no value model
  # (Shao et al. 2024); ppo: a value head on the policy's hidden state, GAE, KL to the
  # reference in the per-token reward (Ouyang et al. 2022).
  algorithm: str = "grpo"
  prompts_per_step: int = 4
  group_size: int = 4  # completions sampled per prompt (GRPO's group; PPO samples them too)
  max_new_tokens: int = 32
  temperature: float = 1.0  # sampling, and the policy's logits in the loss (as TRL)
  top_p: float = 1.0
  # Updates per rollout batch: `epochs` passes of `minibatches` steps each (TRL's
  # num_iterations and its gradient steps per generation).
  epochs: int = 1
  minibatches: int = 1
  clip_eps: float = 0.2  # the ratio's clip range [1 - clip_eps, 1 + clip_eps_high]
  clip_eps_high: float = 0.0  # 0: clip_eps (DAPO's clip-higher when larger)
  kl_beta: float = 0.04  # KL to the reference: GRPO's loss term / PPO's per-token penalty
  # grpo: each completion's mean token loss, averaged over completions; token: the mean over
  # every completion token of the batch (DAPO, TRL's bnpo); dr_grpo: summed over tokens / the
  # batch's completions x max_new_tokens (Dr. GRPO).
  loss_type: str = "grpo"
  scale_rewards: bool = True  # GRPO: divide advantages by the group's reward std
  gamma: float = 1.0  # PPO: discount
  lam: float = 0.95  # PPO: GAE's lambda
  vf_coef: float = 0.1  # PPO: weight of the value loss
  value_clip: float = 0.2  # PPO: the value's clip range around its rollout value
  # Rewards from code, summed with `reward_weights` (default 1 each): exact_match (the reply,
  # stripped, equals the record's "answer"), final_number (its last number does), regex (it
  # matches the record's "pattern"), unit_test (the record's "tests" pass against the reply's
  # code in a subprocess); `reward_model` (a `jaxllm reward` workdir) adds its score.
  rewards: tuple[str, ...] = ("exact_match",)
  reward_weights: tuple[str, ...] = ()
  reward_model: str = ""
  reward_model_weight: float = 1.0
  reward_timeout_s: float = 5.0  # a reward function (a unit test) running longer scores NaN
  rollout: str = "engine"  # engine: continuous batching, paged KV, shared prefixes; generate
  eval_prompts: int = 32  # held-out prompts answered greedily before / after (and eval_every)
  max_slots: int = 16  # engine slots (concurrent completions)


@dataclasses.dataclass(frozen=True)
class FinetuneExperiment:
  """A fine-tuning experiment (`--config=FILE` of jaxllm.sft and jaxllm.dpo): the model is the
  base checkpoint's, so there is no model section; `train` holds the optimizer, steps and
  sizes."""
  name: str
  finetune: FinetuneConfig
  lora: AdapterConfig
  dpo: PreferenceConfig
  train: TrainConfig
  rl: RlConfig = RlConfig()

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


_FINETUNE_SECTIONS = {"finetune": FinetuneConfig, "lora": AdapterConfig,
                      "dpo": PreferenceConfig, "train": TrainConfig, "rl": RlConfig}


def validate_finetune(e: FinetuneExperiment) -> None:
  """ConfigError with a one-line reason for a bad fine-tuning experiment."""
  f, a, p = e.finetune, e.lora, e.dpo
  if f.method not in FINETUNE_METHODS:
    raise ConfigError(f"finetune.method={f.method!r} is not one of "
                      f"{', '.join(FINETUNE_METHODS)}")
  if f.loss_on not in ("assistant", "all"):
    raise ConfigError(f"finetune.loss_on={f.loss_on!r} is not one of assistant, all")
  if not 0.0 <= f.eval_fraction < 1.0:
    raise ConfigError(f"finetune.eval_fraction={f.eval_fraction} must be in [0, 1)")
  if f.eval_generate < 0:
    raise ConfigError(f"finetune.eval_generate={f.eval_generate} must be >= 0")
  if f.remat not in ("", *REMAT_POLICIES):
    raise ConfigError(f"finetune.remat={f.remat!r} is not one of {', '.join(REMAT_POLICIES)} "
                      "(or empty: the base's)")
  if f.compute_dtype not in ("", "float32", "bfloat16"):
    raise ConfigError(f"finetune.compute_dtype={f.compute_dtype!r} is not float32 or bfloat16 "
                      "(or empty: the base's)")
  if a.rank < 1 or not a.alpha > 0:
    raise ConfigError(f"lora.rank={a.rank} must be >= 1 and lora.alpha={a.alpha} > 0")
  if not 0.0 <= a.dropout < 1.0:
    raise ConfigError(f"lora.dropout={a.dropout} must be in [0, 1)")
  if a.base_bits not in (4, 8):
    raise ConfigError(f"lora.base_bits={a.base_bits} must be 4 or 8")
  if a.base_group_size < 0 or (a.base_bits == 4 and a.base_group_size % 2):
    raise ConfigError(f"lora.base_group_size={a.base_group_size} must be 0 (per channel) or "
                      "a positive (for int4: even) number of rows")
  if p.loss not in PREFERENCE_LOSSES:
    raise ConfigError(f"dpo.loss={p.loss!r} is not one of {', '.join(PREFERENCE_LOSSES)}")
  if not p.beta > 0 or not 0.0 <= p.label_smoothing < 0.5:
    raise ConfigError(f"dpo.beta={p.beta} must be > 0 and dpo.label_smoothing="
                      f"{p.label_smoothing} in [0, 0.5)")
  validate_rl(e.rl)
  validate_train(e.train)


def validate_rl(r: RlConfig) -> None:
  """ConfigError with a one-line reason for a bad rl section."""
  for name, value, allowed in (("algorithm", r.algorithm, RL_ALGORITHMS),
                               ("loss_type", r.loss_type, RL_LOSS_TYPES),
                               ("rollout", r.rollout, RL_ROLLOUTS)):
    if value not in allowed:
      raise ConfigError(f"rl.{name}={value!r} is not one of {', '.join(allowed)}")
  for name in ("prompts_per_step", "group_size", "max_new_tokens", "epochs", "minibatches",
               "max_slots"):
    if getattr(r, name) < 1:
      raise ConfigError(f"rl.{name}={getattr(r, name)} must be >= 1")
  if r.eval_prompts < 0:
    raise ConfigError(f"rl.eval_prompts={r.eval_prompts} must be >= 0")
  if r.algorithm == "grpo" and r.group_size < 2:
    raise ConfigError(f"rl.group_size={r.group_size}: GRPO's advantages need groups of >= 2 "
                      "completions per prompt")
  if (r.prompts_per_step * r.group_size) % r.minibatches:
    raise ConfigError(f"rl.minibatches={r.minibatches} does not divide the "
                      f"{r.prompts_per_step * r.group_size} completions of a step")
  if not r.temperature > 0 or not 0 < r.top_p <= 1:
    raise ConfigError(f"rl.temperature={r.temperature} must be > 0 and rl.top_p={r.top_p} "
                      "in (0, 1]")
  if not 0 < r.clip_eps < 1 or r.clip_eps_high < 0:
    raise ConfigError(f"rl.clip_eps={r.clip_eps} must be in (0, 1) and rl.clip_eps_high="
                      f"{r.clip_eps_high} >= 0")
  for name in ("kl_beta", "vf_coef", "value_clip"):
    if getattr(r, name) < 0:
      raise ConfigError(f"rl.{name}={getattr(r, name)} must be >= 0")
  if not 0 <= r.gamma <= 1 or not 0 <= r.lam <= 1:
    raise ConfigError(f"rl.gamma={r.gamma} and rl.lam={r.lam} must be in [0, 1]")
  unknown = [n for n in r.rewards if n not in RL_REWARDS and ":" not in n]
  if unknown:
    raise ConfigError(f"rl.rewards: {', '.join(unknown)} is neither one of "
                      f"{', '.join(RL_REWARDS)} nor module:function")
  if not r.rewards and not r.reward_model:
    raise ConfigError("rl.rewards is empty and there is no rl.reward_model: nothing scores "
                      "a completion")
  if r.reward_weights:
    if len(r.reward_weights) != len(r.rewards):
      raise ConfigError(f"rl.reward_weights has {len(r.reward_weights)} entries for "
                        f"{len(r.rewards)} rl.rewards")
    try:
      [float(w) for w in r.reward_weights]
    except ValueError:
      raise ConfigError(f"rl.reward_weights={','.join(r.reward_weights)} must be numbers") \
          from None
  if not r.reward_timeout_s > 0:
    raise ConfigError(f"rl.reward_timeout_s={r.reward_timeout_s} must be > 0")


def finetune_from_config_dict(cd: ml_collections.ConfigDict | Mapping[str, Any]
                              ) -> FinetuneExperiment:
  """Builds and validates a FinetuneExperiment; ConfigError naming the first bad key."""
  name, sections = _name_and_sections(cd, _FINETUNE_SECTIONS, "finetune",
                                      " of a fine-tuning experiment")
  experiment = FinetuneExperiment(name=name, **sections)
  validate_finetune(experiment)
  return experiment


def parse_layers(spec: str) -> tuple[int, ...]:
  """`"0,10,29"` -> (0, 10, 29); raises ConfigError if malformed."""
  try:
    return tuple(int(x) for x in spec.split(",") if x.strip())
  except ValueError:
    raise ConfigError(f"distill.init_layers={spec!r} is not comma-separated layer indices") \
        from None


@dataclasses.dataclass(frozen=True)
class Config:
  name: str
  model: ModelConfig
  data: DataConfig
  train: TrainConfig
  mesh: MeshConfig
  distill: DistillConfig = DistillConfig()

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "mesh": MeshConfig,
             "distill": DistillConfig}


def defaults(section: str) -> dict[str, Any]:
  """Every key of a config section with its default: experiment files start from these so that
  any key can be overridden with `--config.section.key=value` (ml_collections only overrides
  keys the file sets)."""
  return dataclasses.asdict({**_SECTIONS, **_FINETUNE_SECTIONS}[section]())


def _coerce(key: str, value: Any, default: Any) -> Any:
  """Converts a ConfigDict value to the dataclass field's type, or raises ConfigError."""
  if isinstance(default, bool):
    if isinstance(value, bool):
      return value
    raise ConfigError(f"{key}={value!r} must be a bool")
  if isinstance(default, int):
    if isinstance(value, bool) or not isinstance(value, int):
      if isinstance(value, float) and value.is_integer():
        return int(value)
      raise ConfigError(f"{key}={value!r} must be an integer")
    return value
  if isinstance(default, float):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"{key}={value!r} must be a number")
    return float(value)
  if isinstance(default, tuple):
    if isinstance(value, str):
      return tuple(p for p in value.split(",") if p)
    if isinstance(value, (list, tuple)):
      # ml_collections may hand a command-line "a,b" over as the one-element ("a,b",)
      return tuple(p for v in value for p in str(v).split(",") if p)
    raise ConfigError(f"{key}={value!r} must be a list of strings or a comma-separated string")
  if isinstance(default, str):
    if not isinstance(value, str):
      raise ConfigError(f"{key}={value!r} must be a string")
    return value
  return value


def section(name: str, cls: type, values: Mapping[str, Any]):
  """The dataclass `cls` from the ConfigDict section `name` (e.g. train -> TrainConfig), each
  value coerced to its field's type; ConfigError for an unknown key or a wrong type."""
  fields = {f.name: f for f in dataclasses.fields(cls)}
  kwargs = {}
  for key, value in values.items():
    if key not in fields:
      known = ", ".join(sorted(fields))
      raise ConfigError(f"unknown config key {name}.{key} (known keys of {name}: {known})")
    default = fields[key].default
    kwargs[key] = _coerce(f"{name}.{key}", value, default)
  return cls(**kwargs)


def _name_and_sections(cd: ml_collections.ConfigDict | Mapping[str, Any],
                       known: Mapping[str, type], default_name: str,
                       kind: str = "") -> tuple[str, dict[str, Any]]:
  """(name, every section of `known` built from `cd` or left at its defaults); ConfigError
  for a bad name, an unknown section (`kind` says of what) or a bad key."""
  values = cd.to_dict() if isinstance(cd, ml_collections.ConfigDict) else dict(cd)
  name = values.pop("name", default_name)
  if not isinstance(name, str) or not name:
    raise ConfigError("name must be a non-empty string")
  sections = {}
  for key, value in values.items():
    if key not in known:
      raise ConfigError(f"unknown config section {key!r}{kind} (known: name, "
                        f"{', '.join(known)})")
    if not isinstance(value, Mapping):
      raise ConfigError(f"config section {key} must be a mapping, got {value!r}")
    sections[key] = section(key, known[key], value)
  return name, {key: sections[key] if key in sections else cls() for key, cls in known.items()}


def from_config_dict(cd: ml_collections.ConfigDict | Mapping[str, Any]) -> Config:
  """Builds and validates a Config; raises ConfigError naming the first bad key."""
  name, sections = _name_and_sections(cd, _SECTIONS, "experiment")
  config = Config(name=name, **sections)
  validate(config)
  return config


def from_dict(values: Mapping[str, Any]) -> Config:
  """Inverse of `Config.to_dict` (used to read a workdir's config.json)."""
  return from_config_dict(values)


def _positive(key: str, value: float) -> None:
  if value <= 0:
    raise ConfigError(f"{key}={value} must be positive")


def validate_model(m: ModelConfig) -> None:
  """The model section's own constraints (also for configs built in code, e.g. a scaled copy);
  raises ConfigError with a one-line reason."""
  for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
              "max_seq_len"):
    _positive(f"model.{key}", getattr(m, key))
  _positive("model.rope_theta", m.rope_theta)
  _positive("model.norm_eps", m.norm_eps)
  _positive("model.init_std", m.init_std)
  if m.n_heads % m.n_kv_heads:
    raise ConfigError(
        f"model.n_heads={m.n_heads} is not a multiple of model.n_kv_heads={m.n_kv_heads}")
  if m.rope_scaling not in ROPE_SCALINGS:
    raise ConfigError(
        f"model.rope_scaling={m.rope_scaling!r} is not one of {', '.join(ROPE_SCALINGS)}")
  if m.rope_scaling != "none":
    _positive("model.rope_scaling_factor", m.rope_scaling_factor)
  if m.norm_placement not in NORM_PLACEMENTS:
    raise ConfigError(f"model.norm_placement={m.norm_placement!r} is not one of "
                      f"{', '.join(NORM_PLACEMENTS)}")
  if m.mlp_activation not in MLP_ACTIVATIONS:
    raise ConfigError(f"model.mlp_activation={m.mlp_activation!r} is not one of "
                      f"{', '.join(MLP_ACTIVATIONS)}")
  if m.mlp_activation != "silu" and m.n_experts:
    raise ConfigError(f"model.mlp_activation={m.mlp_activation} with model.n_experts: the "
                      "experts are SwiGLU")
  if m.global_every < 0 or (m.global_every and not m.sliding_window):
    raise ConfigError(f"model.global_every={m.global_every} needs model.sliding_window > 0 "
                      "(the local layers' window) and must be >= 0")
  if m.global_every and m.n_experts:
    raise ConfigError("model.global_every with model.n_experts: local and global layers are "
                      "for dense models")
  if m.rope_local_theta < 0 or (m.rope_local_theta and not m.global_every):
    raise ConfigError(f"model.rope_local_theta={m.rope_local_theta} needs "
                      "model.global_every > 0 (it is the local layers' RoPE base)")
  if m.query_pre_attn_scalar != int(m.query_pre_attn_scalar):
    raise ConfigError(f"model.query_pre_attn_scalar={m.query_pre_attn_scalar} must be a whole "
                      "number")
  if min(m.query_pre_attn_scalar, m.final_logit_soft_cap, m.attn_logit_soft_cap) < 0:
    raise ConfigError("model.query_pre_attn_scalar, model.final_logit_soft_cap and "
                      "model.attn_logit_soft_cap must be >= 0 (0 = off)")
  if m.attn_logit_soft_cap and m.attention_impl == "cudnn":
    raise ConfigError("model.attn_logit_soft_cap is not supported by "
                      "model.attention_impl=cudnn (use xla or pallas)")
  if m.qk_norm_over_heads and not m.qk_norm:
    raise ConfigError("model.qk_norm_over_heads=True needs model.qk_norm=True")
  if m.position_encoding not in POSITION_ENCODINGS:
    raise ConfigError(f"model.position_encoding={m.position_encoding!r} is not one of "
                      f"{', '.join(POSITION_ENCODINGS)}")
  if m.position_encoding == "alibi" and m.rope_scaling != "none":
    raise ConfigError(f"model.rope_scaling={m.rope_scaling!r} scales RoPE, which "
                      "model.position_encoding=alibi does not use")
  if m.rope_scaling in ("llama3", "dynamic", "yarn") and m.rope_original_max_len <= 0:
    raise ConfigError(f"model.rope_original_max_len={m.rope_original_max_len} must be positive")
  if m.rope_scaling == "yarn" and not 0 < m.rope_yarn_beta_slow < m.rope_yarn_beta_fast:
    raise ConfigError("model.rope_yarn_beta_slow must be positive and below "
                      "model.rope_yarn_beta_fast")
  if m.rope_attention_factor < 0:
    raise ConfigError(f"model.rope_attention_factor={m.rope_attention_factor} must be >= 0 "
                      "(0: derived from the factor)")
  if m.rope_scaling == "llama3" and not (
      0 < m.rope_low_freq_factor < m.rope_high_freq_factor and m.rope_original_max_len > 0):
    raise ConfigError("model.rope_low_freq_factor must be positive and below "
                      "model.rope_high_freq_factor, with model.rope_original_max_len > 0")
  if m.sliding_window < 0:
    raise ConfigError(f"model.sliding_window={m.sliding_window} must be >= 0 (0 = off)")
  if m.head_dim % 2 and m.position_encoding == "rope":
    raise ConfigError(f"model.head_dim={m.head_dim} must be even (RoPE rotates pairs)")
  for key in ("dtype", "param_dtype"):
    if getattr(m, key) not in DTYPES:
      raise ConfigError(f"model.{key}={getattr(m, key)!r} is not one of {', '.join(DTYPES)}")
  if m.remat not in REMAT_POLICIES:
    raise ConfigError(f"model.remat={m.remat!r} is not one of {', '.join(REMAT_POLICIES)}")
  if m.remat_every < 1 or (m.remat_every > 1 and (
      m.remat == "none" or m.n_experts or m.n_layers % m.remat_every)):
    raise ConfigError(f"model.remat_every={m.remat_every} must be >= 1; above 1 it needs a "
                      "model.remat policy, a dense model and model.n_layers divisible by it")
  if m.attention_impl not in ATTENTION_IMPLS:
    raise ConfigError(
        f"model.attention_impl={m.attention_impl!r} is not one of {', '.join(ATTENTION_IMPLS)}")
  # The flash kernel's head sizes (pallas_kernels HEAD_DIMS; this module stays free of JAX).
  if m.attention_impl == "pallas" and m.head_dim not in (64, 128, 256):
    raise ConfigError(f"model.attention_impl=pallas needs model.head_dim in 64/128/256, "
                      f"not {m.head_dim}")
  _validate_moe(m)


def validate_train(t: TrainConfig) -> None:
  """The checks of the train section on its own (the fine-tuning commands take it without a
  model section); ConfigError with a one-line reason."""
  for key in ("steps", "batch_size", "seq_len", "lr", "grad_accum", "log_every", "eval_every",
              "eval_batches", "checkpoint_every", "keep_checkpoints", "microbatches",
              "pipeline_chunks"):
    _positive(f"train.{key}", getattr(t, key))
  if t.warmup_steps < 0:
    raise ConfigError(f"train.warmup_steps={t.warmup_steps} must be >= 0")
  if t.qat_bits not in (0, 4, 8):
    raise ConfigError(f"train.qat_bits={t.qat_bits} must be 0 (off), 4 or 8")
  if t.qat_group_size < 0 or (t.qat_bits == 4 and t.qat_group_size % 2):
    raise ConfigError(f"train.qat_group_size={t.qat_group_size} must be 0 (per channel) or a "
                      "positive (for int4: even) number of rows")
  if not 0.0 <= t.min_lr_ratio <= 1.0:
    raise ConfigError(f"train.min_lr_ratio={t.min_lr_ratio} must be in [0, 1]")
  if t.weight_decay < 0 or t.z_loss < 0 or t.clip_norm < 0:
    raise ConfigError("train.weight_decay, train.z_loss and train.clip_norm must be >= 0")
  if t.moe_aux_loss < 0 or t.router_z_loss < 0:
    raise ConfigError("train.moe_aux_loss and train.router_z_loss must be >= 0")
  if t.batch_size % t.grad_accum:
    raise ConfigError(
        f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}")
  if t.loss_scaling not in LOSS_SCALINGS:
    raise ConfigError(f"train.loss_scaling={t.loss_scaling!r} is not one of "
                      f"{', '.join(LOSS_SCALINGS)}")
  if not t.loss_scale_init >= 1.0 or t.loss_scale_period < 1:
    raise ConfigError(f"train.loss_scale_init={t.loss_scale_init} must be >= 1 and "
                      f"train.loss_scale_period={t.loss_scale_period} >= 1")
  if (t.checkpoint_minutes < 0 or t.watchdog_s < 0 or t.rollback_limit < 0
      or t.straggler_factor < 0):
    raise ConfigError("train.checkpoint_minutes, train.watchdog_s, train.rollback_limit and "
                      "train.straggler_factor must be >= 0")
  for key in ("spike_loss_factor", "spike_grad_factor"):
    if getattr(t, key) != 0 and not getattr(t, key) > 1:
      raise ConfigError(f"train.{key}={getattr(t, key)} must be 0 (off) or above 1")
  _positive("train.spike_window", t.spike_window)
  _positive("train.local_checkpoint_every", t.local_checkpoint_every)
  parse_skip_steps(t.skip_steps)


def validate(config: Config) -> None:
  """Checks constraints between keys; raises ConfigError with a one-line reason."""
  m, t, d, mesh = config.model, config.train, config.data, config.mesh
  validate_model(m)
  validate_train(t)
  if t.seq_len > m.max_seq_len:
    raise ConfigError(f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
  if not 0.0 < d.eval_fraction < 1.0:
    raise ConfigError(f"data.eval_fraction={d.eval_fraction} must be in (0, 1)")
  if d.tokenizer_max_sentences <= 0:
    raise ConfigError("data.tokenizer_max_sentences must be positive")
  _validate_data_mixing(d)
  _validate_seq_len_schedule(t, mesh)
  k = config.distill
  if k.temperature <= 0 or not 0.0 <= k.alpha <= 1.0 or k.top_k < 0:
    raise ConfigError(f"distill.temperature={k.temperature} must be > 0, distill.alpha="
                      f"{k.alpha} in [0, 1] and distill.top_k={k.top_k} >= 0")
  layers = parse_layers(k.init_layers)
  if layers and len(layers) != m.n_layers:
    raise ConfigError(f"distill.init_layers names {len(layers)} teacher layers for a student "
                      f"of model.n_layers={m.n_layers}")
  for key in ("data", "fsdp", "tensor", "stage", "expert"):
    value = getattr(mesh, key)
    if value == 0 or value < -1:
      raise ConfigError(f"mesh.{key}={value} must be a positive device count or -1")
  if sum(getattr(mesh, k) == -1 for k in ("data", "fsdp", "tensor", "stage", "expert")) > 1:
    raise ConfigError("at most one mesh axis may be -1 (all remaining devices)")
  if mesh.slices < 1:
    raise ConfigError(f"mesh.slices={mesh.slices} must be at least 1")
  if mesh.context < 1:
    raise ConfigError(f"mesh.context={mesh.context} must be a positive device count")
  if mesh.zero_stage not in ZERO_STAGES:
    raise ConfigError(f"mesh.zero_stage={mesh.zero_stage} is not one of 0, 1, 2 (ZeRO stage 3, "
                      "parameters sharded too, is mesh.fsdp)")
  _validate_pipeline_schedule(config)
  profile = parse_profile_steps(t.profile_steps)
  if profile and profile[0] > t.steps:
    raise ConfigError(f"train.profile_steps={t.profile_steps!r} starts after the last step "
                      f"(train.steps={t.steps})")
  if t.context_parallel not in CONTEXT_PARALLEL:
    raise ConfigError(f"train.context_parallel={t.context_parallel!r} is not one of "
                      f"{', '.join(CONTEXT_PARALLEL)}")
  if t.context_parallel == "ring" and mesh.context > 1 and t.seq_len % (2 * mesh.context):
    raise ConfigError(f"train.context_parallel=ring splits train.seq_len={t.seq_len} into "
                      f"2 x mesh.context = {2 * mesh.context} equal chunks: it must divide")
  if t.seq_len % mesh.context:
    raise ConfigError(f"train.seq_len={t.seq_len} is not divisible by mesh.context="
                      f"{mesh.context}")


def pipeline_schedule(t: TrainConfig) -> str:
  """The schedule train.pipeline_schedule names ("auto" resolved by train.pipeline_chunks)."""
  if t.pipeline_schedule != "auto":
    return t.pipeline_schedule
  return "circular" if t.pipeline_chunks > 1 else "gpipe"


def _validate_pipeline_schedule(config: Config) -> None:
  t, m = config.train, config.model
  if t.pipeline_schedule not in PIPELINE_SCHEDULES:
    raise ConfigError(f"train.pipeline_schedule={t.pipeline_schedule!r} is not one of "
                      f"{', '.join(PIPELINE_SCHEDULES)}")
  schedule = pipeline_schedule(t)
  if (schedule == "circular") != (t.pipeline_chunks > 1):
    raise ConfigError(f"train.pipeline_schedule={schedule} with train.pipeline_chunks="
                      f"{t.pipeline_chunks}: the circular schedule, and only it, runs "
                      "pipeline_chunks > 1 layer chunks per stage")
  if schedule != "1f1b":
    return
  if m.n_experts:
    raise ConfigError("train.pipeline_schedule=1f1b runs dense models (an MoE model's routing "
                      "losses need every microbatch's statistics first); use gpipe or circular")
  if loss_scaling_on(config):
    raise ConfigError("train.pipeline_schedule=1f1b does not scale its loss: use "
                      "model.dtype=bfloat16 (or train.loss_scaling=none) with it")


def _validate_data_mixing(d: DataConfig) -> None:
  if d.packing not in PACKINGS:
    raise ConfigError(f"data.packing={d.packing!r} is not one of {', '.join(PACKINGS)}")
  if d.packing_bins < 1:
    raise ConfigError(f"data.packing_bins={d.packing_bins} must be positive")
  if d.order not in DATA_ORDERS:
    raise ConfigError(f"data.order={d.order!r} is not one of {', '.join(DATA_ORDERS)}")
  if d.undecodable not in UNDECODABLE:
    raise ConfigError(f"data.undecodable={d.undecodable!r} is not one of "
                      f"{', '.join(UNDECODABLE)}")
  sources = parse_sources(d.sources)
  weights = parse_mixture(d.mixture)
  if sources and d.paths:
    raise ConfigError("data.paths and data.sources are exclusive: name every path as a source")
  if weights and not sources:
    raise ConfigError("data.mixture weighs named sources: set data.sources (name=path entries)")
  if weights and set(weights) != set(sources):
    missing = sorted(set(sources) - set(weights))
    unknown = sorted(set(weights) - set(sources))
    raise ConfigError(
        "data.mixture must weigh every source of data.sources once"
        + (f"; no weight for {', '.join(missing)}" if missing else "")
        + (f"; no source named {', '.join(unknown)}" if unknown else ""))


def _validate_seq_len_schedule(t: TrainConfig, mesh: MeshConfig) -> None:
  previous_length, previous_until = 0, 0
  for length, until in parse_seq_len_schedule(t.seq_len_schedule):
    if length <= previous_length or until <= previous_until or length >= t.seq_len:
      raise ConfigError(f"train.seq_len_schedule={t.seq_len_schedule!r}: lengths and steps "
                        f"must increase, lengths below train.seq_len={t.seq_len}")
    if t.seq_len % length:
      raise ConfigError(f"train.seq_len_schedule length {length} does not divide "
                        f"train.seq_len={t.seq_len}")
    split = 2 * mesh.context if t.context_parallel == "ring" else mesh.context
    if length % split:
      raise ConfigError(f"train.seq_len_schedule length {length} is not divisible by the "
                        f"{split} context-parallel chunks")
    previous_length, previous_until = length, until


def _validate_moe(m: ModelConfig) -> None:
  if m.n_experts < 0:
    raise ConfigError(f"model.n_experts={m.n_experts} must be >= 0 (0 = dense)")
  if m.moe_impl not in MOE_IMPLS:
    raise ConfigError(f"model.moe_impl={m.moe_impl!r} is not one of {', '.join(MOE_IMPLS)}")
  if m.n_experts == 0:
    return
  if not 1 <= m.experts_per_token <= m.n_experts:
    raise ConfigError(f"model.experts_per_token={m.experts_per_token} must be in "
                      f"[1, model.n_experts={m.n_experts}]")
  if m.moe_d_ff < 0 or m.n_shared_experts < 0:
    raise ConfigError("model.moe_d_ff and model.n_shared_experts must be >= 0")
  if m.shared_expert_gate and not m.n_shared_experts:
    raise ConfigError("model.shared_expert_gate needs model.n_shared_experts > 0")
  if m.moe_every < 1:
    raise ConfigError(f"model.moe_every={m.moe_every} must be >= 1")
  if not 0 <= m.first_dense_layers or m.n_layers - m.first_dense_layers < m.moe_every:
    raise ConfigError(f"model.first_dense_layers={m.first_dense_layers} and model.moe_every="
                      f"{m.moe_every} leave no MoE layer among model.n_layers={m.n_layers}")
  if m.router not in ROUTERS:
    raise ConfigError(f"model.router={m.router!r} is not one of {', '.join(ROUTERS)}")
  if m.capacity_factor < 0 or m.router_bias_update_rate < 0:
    raise ConfigError("model.capacity_factor and model.router_bias_update_rate must be >= 0")


def _validate_pipeline(m: ModelConfig, t: TrainConfig, sizes: dict[str, int], micro: int,
                       batch_shards: int) -> None:
  """The pipeline cuts the stacked layers into equal units: layers of a dense model, groups of
  `moe_every` layers (the last MoE) of an MoE model, whose MoE layers also need each
  microbatch to split over the batch shards."""
  units, what = m.n_layers, f"model.n_layers={m.n_layers}"
  if m.n_experts:
    if m.first_dense_layers or m.n_layers % m.moe_every:
      raise ConfigError("pipeline stages (mesh.stage > 1) need an MoE layout of whole groups: "
                        "model.first_dense_layers=0 and model.n_layers divisible by "
                        "model.moe_every")
    units = m.n_layers // m.moe_every
    what = f"the {units} MoE layer groups (model.n_layers / model.moe_every)"
  if units % (sizes["stage"] * t.pipeline_chunks):
    raise ConfigError(f"{what} must be divisible by the mesh.stage={sizes['stage']} pipeline "
                      f"stages x train.pipeline_chunks={t.pipeline_chunks}")
  if t.pipeline_chunks > 1 and t.microbatches < sizes["stage"]:
    raise ConfigError(f"the circular schedule (train.pipeline_chunks={t.pipeline_chunks}) needs "
                      f"train.microbatches >= mesh.stage={sizes['stage']}")
  if micro % t.microbatches:
    raise ConfigError(f"train.batch_size / train.grad_accum = {micro} is not divisible by "
                      f"train.microbatches={t.microbatches}")
  if m.n_experts and (micro // t.microbatches) % batch_shards:
    raise ConfigError(f"each of the train.microbatches={t.microbatches} microbatches "
                      f"({micro // t.microbatches} rows) must split over the {batch_shards} "
                      "batch shards (the MoE layers dispatch per shard)")


def devices_available(n: int) -> str:
  """"1 is available" / "8 are available": the end of the errors about too few devices."""
  return f"{n} {'is' if n == 1 else 'are'} available"


def resolve_mesh_shape(mesh: MeshConfig, num_devices: int) -> dict[str, int]:
  """Mesh axis sizes with -1 filled in; raises ConfigError if they do not tile the devices."""
  sizes = {k: getattr(mesh, k) for k in ("data", "fsdp", "tensor", "stage", "expert")}
  if mesh.context != 1:  # only a context-parallel mesh has the axis
    sizes["context"] = mesh.context
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if num_devices % fixed:
    raise ConfigError(
        f"mesh {sizes} needs a multiple of {fixed} devices, but "
        f"{devices_available(num_devices)}")
  for k, v in sizes.items():
    if v == -1:
      sizes[k] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise ConfigError(f"mesh {sizes} uses {math.prod(sizes.values())} devices, "
                      f"but {devices_available(num_devices)} (set one axis to -1)")
  return sizes


def validate_for_devices(config: Config, num_devices: int,
                         platform: str | None = None) -> dict[str, int]:
  """Device-dependent checks (run before compiling); returns the resolved mesh shape.

  `platform` is JAX's default backend ("cpu", "gpu", "tpu") where known.
  """
  sizes = resolve_mesh_shape(config.mesh, num_devices)
  t, m = config.train, config.model
  # The expert axis splits the batch too (the MoE layers exchange tokens over it).
  batch_shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
  micro = t.batch_size // t.grad_accum
  if micro % batch_shards:
    raise ConfigError(
        f"train.batch_size={t.batch_size} / train.grad_accum={t.grad_accum} = {micro} is not "
        f"divisible by the {batch_shards} batch shards (mesh.data x mesh.fsdp x mesh.expert)")
  if sizes["tensor"] > 1 and (m.n_kv_heads % sizes["tensor"] or m.n_heads % sizes["tensor"]):
    raise ConfigError(f"model.n_kv_heads={m.n_kv_heads} and model.n_heads={m.n_heads} must be "
                      f"divisible by mesh.tensor={sizes['tensor']}")
  if m.attention_impl == "cudnn" and platform not in (None, "gpu"):
    raise ConfigError(f"model.attention_impl=cudnn needs a GPU (this machine runs {platform})")
  # XLA:CPU has one memory space: there is no host memory to offload to.
  if platform == "cpu" and (t.offload_optimizer or m.remat == "offload_dots"):
    raise ConfigError("train.offload_optimizer and model.remat=offload_dots move data to host "
                      "memory, which needs a GPU or TPU (this machine runs cpu)")
  if sizes["expert"] > 1:
    if not m.n_experts:
      raise ConfigError(f"mesh.expert={sizes['expert']} needs an MoE model (model.n_experts > 0);"
                        " a dense model splits its batch over mesh.data instead")
    if m.n_experts % sizes["expert"]:
      raise ConfigError(f"model.n_experts={m.n_experts} is not divisible by "
                        f"mesh.expert={sizes['expert']}")
  if sizes["stage"] > 1:
    _validate_pipeline(m, t, sizes, micro, batch_shards)
  if sizes["stage"] > 1 and m.remat_every > 1:
    raise ConfigError(f"model.remat_every={m.remat_every} selects layers of an unpipelined "
                      "model; under mesh.stage > 1 remat applies to every layer")
  if config.mesh.sequence_parallel and (sizes["tensor"] < 2 or t.seq_len % sizes["tensor"]):
    raise ConfigError(f"mesh.sequence_parallel splits train.seq_len={t.seq_len} over "
                      f"mesh.tensor={sizes['tensor']}: it needs a tensor axis > 1 that divides it")
  if config.mesh.sequence_parallel:
    for length, _ in parse_seq_len_schedule(t.seq_len_schedule):
      if length % sizes["tensor"]:
        raise ConfigError(f"train.seq_len_schedule length {length} is not divisible by "
                          f"mesh.tensor={sizes['tensor']} (mesh.sequence_parallel)")
  if (sizes["stage"] * sizes["data"]) % config.mesh.slices:
    raise ConfigError(f"mesh.slices={config.mesh.slices} must divide mesh.stage x mesh.data = "
                      f"{sizes['stage'] * sizes['data']}: only those axes may cross slices")
  return sizes


def cache_dir() -> str:
  """jaxllm's cache: `$JAXLLM_CACHE`, default `~/.cache/jaxllm` (fetched models, built
  kernels)."""
  return os.path.expanduser(os.environ.get("JAXLLM_CACHE", "~/.cache/jaxllm"))
