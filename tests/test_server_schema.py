"""The OpenAI server driven by schemathesis: requests generated from the server's own OpenAPI
schema (valid and invalid ones), each answered without a 5xx, every error in OpenAI's JSON shape.

A tiny random model with a small vocabulary serves them, so each generated request costs
milliseconds; the number of examples per endpoint and the context (64 tokens) bound the work.
"""

import zlib

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")
hypothesis = pytest.importorskip("hypothesis")

from jaxllm.checkpoint import convert  # noqa: E402
from jaxllm.data import tokenizer as tokenizer_lib  # noqa: E402
from jaxllm.inference import server as server_lib  # noqa: E402
from jaxllm.model import transformer  # noqa: E402
from tests.helpers import tiny_model  # noqa: E402

NAME = "tiny"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  cfg = tiny_model(vocab_size=32, max_seq_len=64, dtype="float32")
  _, params = transformer.split(transformer.create(cfg, 0))
  pieces = ["<s>", "</s>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + [" ", ".", "?", "!"]
  tok = tokenizer_lib.HFTokenizer(tokenizer_lib.tokenizer_from_gguf_vocab(
      pieces, [], [3, 3] + [1] * 30, "gpt2"), bos_id=0, eos_id=1,
      chat_template="{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
  path = str(tmp_path_factory.mktemp("served") / "tiny")
  convert.export_orbax(convert.Checkpoint(cfg, params, tok, "jaxllm"), path)
  app, engine = server_lib.build(path, max_slots=4, page_size=16, num_pages=32, prefill_chunk=16,
                                 model_name=NAME)
  from fastapi.testclient import TestClient
  warm = TestClient(app).post("/v1/completions", json={"model": NAME, "prompt": "hi",
                                                       "max_tokens": 2})
  assert warm.status_code == 200, warm.text
  yield app
  engine.shutdown()


@pytest.fixture(scope="module")
def api_schema(served):
  return schemathesis.openapi.from_asgi("/openapi.json", served)


def _check(case):
  if isinstance(case.body, dict) and case.body.get("model") not in (None, NAME):
    # Half the generated bodies name this server's model, so generation runs, not only the 404.
    if zlib.crc32(repr(sorted(case.body.items())).encode("utf-8", "replace")) % 2:
      case.body["model"] = NAME
  response = case.call(timeout=120)  # the first requests of a shape compile
  assert response.status_code < 500, (case.body, response.status_code, response.text[:500])
  if response.status_code >= 400:
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}, response.text


@pytest.mark.parametrize("mode", ["positive", "negative"])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/tokenize",
                                  "/detokenize"])
def test_no_generated_request_gets_a_server_error(api_schema, path, mode):
  operation = api_schema[path]["POST"]
  strategy = operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode))

  @hypothesis.given(strategy)
  @hypothesis.settings(max_examples=30, deadline=None, derandomize=True, database=None,
                       suppress_health_check=list(hypothesis.HealthCheck))
  def run(case):
    _check(case)

  run()
