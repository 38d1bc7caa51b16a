"""Two local processes (3 CPU devices each, gloo collectives) serve a tiny random model with
SmolLM2's tokenizer (`helpers.write_tiny_chat_model`) on one mesh that spans them (data=2 x tensor=3): process 0 answers HTTP, process 1 follows its engine steps.
The openai client's greedy answers equal one-device generation, and stopping process 0 stops
process 1 cleanly."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
import httpx  # noqa: E402

import jaxllm  # noqa: E402
from tests.helpers import REPO, xla_flags  # noqa: E402


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_serve_one_model(tiny_chat_model):
  path = tiny_chat_model
  coordinator, http = _free_port(), _free_port()
  env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
         "XLA_FLAGS": xla_flags(devices=3), "JAX_PLATFORMS": "cpu"}
  procs = [subprocess.Popen(
      [sys.executable, "-m", "jaxllm.serve", f"--checkpoint={path}", "--model_name=smol",
       "--mesh=data=2,tensor=3", "--max_slots=4", "--max_seq_len=256", f"--port={http}",
       f"--coordinator_address=127.0.0.1:{coordinator}", "--num_processes=2",
       f"--process_id={i}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  try:
    base = f"http://127.0.0.1:{http}"
    for _ in range(600):
      if any(p.poll() is not None for p in procs):
        break
      try:
        if httpx.get(f"{base}/health", timeout=1).status_code == 200:
          break
      except httpx.HTTPError:
        time.sleep(0.5)
    assert all(p.poll() is None for p in procs), [p.communicate()[0][-3000:] for p in procs]
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=300)
    model = jaxllm.load(path)
    prompt = "def fibonacci(n):"
    completion = client.completions.create(model="smol", prompt=prompt, max_tokens=12,
                                           temperature=0)
    assert completion.choices[0].text == model.generate(prompt, max_tokens=12)
    messages = [{"role": "user", "content": "What is a Python list?"}]
    chat = client.chat.completions.create(model="smol", messages=messages, max_tokens=10,
                                          temperature=0, n=2)
    want = model.generate([model.chat_ids(messages)], max_tokens=10, details=True)[0].text
    assert [c.message.content for c in chat.choices] == [want, want]
  finally:
    procs[0].send_signal(signal.SIGINT)  # uvicorn stops, the engine tells the follower
    outputs = []
    for p in procs:
      try:
        outputs.append(p.communicate(timeout=120)[0])
      except subprocess.TimeoutExpired:
        p.kill()
        outputs.append(p.communicate()[0])
  assert procs[1].returncode == 0, outputs[1][-3000:]
  # Process 0 said where it serves and the pool it chose (the CPU default budget, 1 GiB, holds
  # more than 4 slots x 256 tokens: the pool is those 64 pages), and logged each request.
  assert (f"serving smol on http://127.0.0.1:{http} (KV pool: 64 pages x 16 tokens = 1024 "
          "tokens") in outputs[0], outputs[0][-3000:]
  for path, tokens in (("completions", completion.usage.completion_tokens),
                       ("chat/completions", chat.usage.completion_tokens)):
    assert re.search(f'"POST /v1/{path}" 200 {tokens} tokens [0-9]+ ms', outputs[0]), (
        path, outputs[0][-3000:])
