"""Multi-host serving: process 0 schedules, every process runs the same engine steps.

On a TPU pod slice or a multi-host GPU system the model's mesh spans processes, and every
process must issue the same jitted steps with the same host arguments in the same order. Only
process 0 serves HTTP and holds the request queue (the JetStream / tpu-inference pattern). At the
start of every engine step process 0 broadcasts what arrived since the last one (new requests
with their sampling parameters and arrival times, cancellations, shutdown); every process
applies it to its own `Engine` and then runs the step. The engine's scheduling is a pure
function of that history (arrival order, prompts, sampled tokens, which every process reads
from the same device arrays), so all processes take the same decisions without talking again.

The broadcast is one collective of a fixed 4 KiB buffer per step (a second, sized one only when
a step's arrivals do not fit), through `jax.experimental.multihost_utils`.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np

from jaxllm.inference import sampling

BUFFER_BYTES = 4096


def is_leader() -> bool:
  return jax.process_index() == 0


def broadcast_bytes(payload: bytes | None) -> bytes:
  """Process 0's `payload` on every process (the others pass None)."""
  from jax.experimental import multihost_utils
  buf = np.zeros(BUFFER_BYTES, np.uint8)
  if is_leader():
    head = np.frombuffer(len(payload).to_bytes(8, "little") + payload[:BUFFER_BYTES - 8],
                         np.uint8)
    buf[:len(head)] = head
  buf = np.asarray(multihost_utils.broadcast_one_to_all(buf))
  n = int.from_bytes(buf[:8].tobytes(), "little")
  if n <= BUFFER_BYTES - 8:
    return buf[8:8 + n].tobytes()
  size = 1 << (n - 1).bit_length()  # a few compiled sizes, not one per length
  rest = np.zeros(size, np.uint8)
  if is_leader():
    rest[:n - (BUFFER_BYTES - 8)] = np.frombuffer(payload[BUFFER_BYTES - 8:], np.uint8)
  rest = np.asarray(multihost_utils.broadcast_one_to_all(rest))
  return buf[8:].tobytes() + rest[:n - (BUFFER_BYTES - 8)].tobytes()


@dataclasses.dataclass
class Events:
  """What happened between two engine steps, in the order it happened."""
  submitted: list[dict] = dataclasses.field(default_factory=list)
  cancelled: list[str] = dataclasses.field(default_factory=list)
  stop: bool = False

  def encode(self) -> bytes:
    return json.dumps(dataclasses.asdict(self)).encode()

  @classmethod
  def decode(cls, raw: bytes) -> Events:
    return cls(**json.loads(raw.decode()))


def request_event(request_id: str, prompt: list[int], params: sampling.SamplingParams,
                  arrival: float, key: int, adapter: int = 0) -> dict:
  fields = dataclasses.asdict(params)
  fields["stop"], fields["stop_token_ids"] = list(params.stop), list(params.stop_token_ids)
  return {"id": request_id, "prompt": prompt, "params": fields, "arrival": arrival, "key": key,
          "adapter": adapter}


def params_from_event(fields: dict) -> sampling.SamplingParams:
  return sampling.SamplingParams(**{**fields, "stop": tuple(fields["stop"]),
                                    "stop_token_ids": tuple(fields["stop_token_ids"])})


def exchange(events: Events | None) -> Events:
  """Process 0's events on every process (the others pass None)."""
  return Events.decode(broadcast_bytes(events.encode() if is_leader() else None))
