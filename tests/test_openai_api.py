"""Request mapping and response building of the OpenAI API, without HTTP or a model."""

import json
import types

import pydantic
import pytest

pytest.importorskip("fastapi")
from jaxllm.inference import openai_api as api  # noqa: E402
from jaxllm.inference import sampling  # noqa: E402


class _Tok:
  def decode(self, ids):
    return "".join(chr(ord("a") + i) for i in ids)


def _request(tokens, reason, stop=(), text=""):
  return types.SimpleNamespace(tokens=tokens, logprobs=[-0.5] * len(tokens),
                               finish_reason=reason, params=sampling.SamplingParams(stop=stop),
                               text=text)


def test_requests_map_to_sampling_params_and_bounds_are_validated():
  body = api.CompletionRequest(model="m", prompt="hi", temperature=0.5, top_p=0.9, stop="\n",
                               max_completion_tokens=7, seed=3)
  sp = api.sampling_params(body, seed=4)
  assert (sp.temperature, sp.top_p, sp.max_tokens, sp.stop, sp.seed) == (0.5, 0.9, 7, ("\n",),
                                                                         4)
  assert api.sampling_params(api.CompletionRequest(model="m", prompt=[1]), 0).max_tokens == 16
  ext = api.sampling_params(api.CompletionRequest(
      model="m", prompt="x", max_tokens=8, min_tokens=2, ignore_eos=True, stop_token_ids=[5, 3],
      logit_bias={"7": -100, "3": 2.5}), 0)
  assert (ext.min_tokens, ext.ignore_eos, ext.stop_token_ids, ext.logit_bias) == (
      2, True, (5, 3), ((3, 2.5), (7, -100.0)))
  with pytest.raises(api.APIError, match="min_tokens"):
    api.sampling_params(api.CompletionRequest(model="m", prompt="x", max_tokens=2,
                                              min_tokens=3), 0)
  for bad in ({"temperature": 2.5}, {"top_p": 0}, {"n": 17}, {"stop": [""]},
              {"stop": ["a"] * (api.MAX_STOPS + 1)}, {"seed": -1}, {"logprobs": 6}, {"prompt": "\udcff"},
              {"logit_bias": {"-1": 1}}, {"logit_bias": {"1": 101}}, {"min_tokens": -1},
              {"stop_token_ids": [-2]}):
    with pytest.raises(pydantic.ValidationError):
      api.CompletionRequest(**{"model": "m", "prompt": "x", **bad})
  error = api.submit_error(ValueError("prompt (9 tokens) + max_tokens (8) exceeds the context"),
                           chat=True)
  assert (error.status, error.param, error.code) == (400, "messages", "context_length_exceeded")


def test_responses_whole_and_streamed():
  out = api.Responses(_Tok(), "tiny")
  body = api.ChatRequest(model="tiny", messages=[{"role": "user", "content": "x"}],
                         logprobs=True, n=2)
  reqs = [_request([0, 1], "length"), _request([2], "stop", stop=("z",), text="c")]
  whole = out.full(body, reqs, "id-1", True, [[5, 6, 7]])
  assert [c["message"]["content"] for c in whole["choices"]] == ["ab", "c"]
  assert [c["finish_reason"] for c in whole["choices"]] == ["length", "stop"]
  assert whole["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
  assert whole["choices"][0]["logprobs"]["content"][1] == {
      "token": "b", "logprob": -0.5, "bytes": None, "top_logprobs": []}
  event = out.chunk(body, "id-1", True, 1, "c", tokens=[2], logprobs=[-0.5])
  assert event.startswith("data: ") and event.endswith("\n\n")
  data = json.loads(event[6:])
  assert data["object"] == "chat.completion.chunk" and data["choices"][0]["delta"] == {
      "content": "c"}
  opening = json.loads(out.chunk(body, "id-1", True, 0, "", role=True)[6:])
  assert opening["choices"][0]["delta"] == {"role": "assistant", "content": ""}
  completion = api.CompletionRequest(model="tiny", prompt="x")
  assert json.loads(out.chunk(completion, "id-2", False, 0, "", finish="stop")[6:])[
      "choices"][0] == {"index": 0, "text": "", "finish_reason": "stop", "logprobs": None}


def test_output_constraints_map_to_one_grammar_spec():
  """response_format, structured_outputs and vLLM's guided_* spellings become one
  `grammar.GrammarSpec`; text (or nothing) none; two at once, or a schema that is not JSON,
  a 400 naming the field."""
  pytest.importorskip("llguidance")
  chat = lambda **kw: api.ChatRequest(model="m", messages=[{"role": "user", "content": "x"}], **kw)
  schema = {"type": "object"}
  cases = [
      (dict(response_format={"type": "json_schema", "json_schema": {"name": "a",
                                                                    "schema": schema}}),
       ("response_format", "json_schema", schema)),
      (dict(response_format={"type": "json_object"}), ("response_format", "json_object", None)),
      (dict(structured_outputs={"json": json.dumps(schema)}),
       ("structured_outputs.json", "json_schema", schema)),
      (dict(structured_outputs={"regex": "a+"}), ("structured_outputs.regex", "regex", "a+")),
      (dict(guided_grammar="start: x"), ("guided_grammar", "lark", "start: x")),
      (dict(guided_choice=["a", "b"]), ("guided_choice", "choice", ["a", "b"])),
  ]
  for fields, (param, kind, source) in cases:
    got_param, spec = api.grammar_spec(chat(**fields))
    assert (got_param, spec.kind, spec.source) == (param, kind, source), fields
  assert api.grammar_spec(chat()) is None
  assert api.grammar_spec(chat(response_format={"type": "text"})) is None
  for fields, param in ((dict(guided_regex="a", guided_choice=["b"]), "guided_choice"),
                        (dict(structured_outputs={"json": "{x"}), "structured_outputs.json"),
                        (dict(response_format={"type": "json_schema"}),
                         "response_format.json_schema")):
    with pytest.raises(api.APIError) as e:
      api.grammar_spec(chat(**fields))
    assert (e.value.status, e.value.param) == (400, param), fields
