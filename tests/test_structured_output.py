"""Structured output (`jaxllm.inference.grammar`): the token mask against references that do not
use our code, and the engine's constrained generations against an independent JSON schema
validator (`jsonschema`), Python's `re` and the choices themselves.

The model is the tiny random one with SmolLM2's tokenizer (`tiny_chat_model`): at temperature 1
it draws nearly uniformly among what the grammar allows, which explores a grammar harder than a
trained model would. The server's side (response_format, the extension, bad requests) is in
test_server.py, on its live server.
"""

import json
import random
import re

import chex
import jax.numpy as jnp
import numpy as np
import pytest

llguidance = pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

import jaxllm  # noqa: E402
from jaxllm.data import tokenizer as tokenizer_lib  # noqa: E402
from jaxllm.inference import engine as engine_lib  # noqa: E402
from jaxllm.inference import grammar  # noqa: E402
from jaxllm.inference import sampling  # noqa: E402
from tests.helpers import REPO  # noqa: E402


@pytest.fixture(scope="module")
def chat(tiny_chat_model):
  model = jaxllm.load(tiny_chat_model)
  return model, grammar.Vocabulary(model.tokenizer, model.config.vocab_size)


@pytest.fixture(scope="module")
def sentencepiece():
  """A 400-piece sentencepiece BPE (byte fallback, control pieces) learned on this repo's
  Python sources; its vocabulary goes to the grammar engine piece by piece."""
  import glob
  lines = [l.rstrip("\n") for p in sorted(glob.glob(f"{REPO}/jaxllm/inference/*.py"))
           for l in open(p) if l.strip()]
  return tokenizer_lib.train_sentencepiece(lines, 400, max_sentences=20_000)


class TestMaskApplication(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_bits_select_exactly_the_allowed_tokens(self):
    """Bit j of word i is token 32 i + j, a partial last word included (V = 77)."""
    rng = np.random.default_rng(0)
    B, V = 3, 77
    mask = rng.integers(-2 ** 31, 2 ** 31, size=(B, grammar.words(V)), dtype=np.int64)
    mask = mask.astype(np.int32)
    mask[2] = -1  # an unconstrained row
    logits = rng.normal(size=(B, V)).astype(np.float32)
    got = np.asarray(self.variant(sampling.apply_token_mask)(jnp.asarray(logits),
                                                              jnp.asarray(mask)))
    allowed = np.array([[(int(mask[b, t // 32]) >> (t % 32)) & 1 for t in range(V)]
                        for b in range(B)], bool)
    np.testing.assert_array_equal(got, np.where(allowed, logits, -1e30))
    np.testing.assert_array_equal(grammar.unpack(mask, V), allowed)
    assert allowed[2].all() and 0 < allowed[:2].sum() < 2 * V


CHOICES = ["yes", "no", "maybe not", "x = 1\n", "no thanks"]


def _check_choice_masks(tokenizer, vocab_size, vocabulary):
  """Along every choice's own tokens, the allowed set is the tokens whose text continues the
  text so far into a prefix of some choice (plus EOS once the text is a whole choice): the
  reference is the tokenizer's own decode, not the grammar engine. Where the grammar forces
  the next text (one choice left), the mask keeps the canonical tokens of that text only: a
  subset holding the choice's own next token."""
  pieces = [tokenizer.decode([t]) if t < tokenizer.vocab_size else "\x00"
            for t in range(vocab_size)]
  special = {tokenizer.eos_id, tokenizer.bos_id, tokenizer.pad_id}
  checked = 0
  for choice in CHOICES:
    constraint = vocabulary.constraint(grammar.GrammarSpec("choice", CHOICES))
    ids = tokenizer.encode(choice)
    for n in range(len(ids) + 1):
      text = tokenizer.decode(ids[:n])
      mask = np.zeros(grammar.words(vocab_size), np.int32)
      constraint.fill(mask)
      allowed = set(np.nonzero(grammar.unpack(mask[None], vocab_size)[0])[0].tolist())
      want = {t for t, p in enumerate(pieces) if p and t not in special
              and any(c.startswith(text + p) for c in CHOICES)}
      if text in CHOICES:
        want.add(tokenizer.eos_id)
      if constraint.forced_bytes():
        assert allowed <= want and ids[n] in allowed, (choice, text, sorted(allowed - want))
      else:
        assert allowed == want, (choice, text, sorted(allowed ^ want)[:10])
        checked += 1
      if n < len(ids):
        assert constraint.consume(ids[n]), (choice, n)
    assert constraint.accepting
  return checked


def test_choice_masks_equal_the_tokenizers_own_decoding(chat, sentencepiece):
  model, vocabulary = chat
  assert _check_choice_masks(model.tokenizer, model.config.vocab_size, vocabulary) >= 5
  sp_vocabulary = grammar.Vocabulary(sentencepiece, sentencepiece.vocab_size + 5)
  assert _check_choice_masks(sentencepiece, sentencepiece.vocab_size + 5, sp_vocabulary) >= 5


SPECS = [grammar.GrammarSpec("json_schema", {
             "type": "object", "properties": {"a": {"type": "integer"},
                                              "b": {"type": "array", "items": {"type": "string"}}},
             "required": ["a"]}),
         grammar.GrammarSpec("json_object"),
         grammar.GrammarSpec("regex", r"([0-9]{1,3}\.){3}[0-9]{1,3}"),
         grammar.GrammarSpec("lark", 'start: "say " word ("," word)*\nword: /[a-z]+/')]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.kind)
def test_masks_equal_the_grammar_engines_byte_masks_along_sampled_text(chat, spec):
  """On a corpus of prefixes (random walks through the grammar), our bitmask equals
  llguidance's other output, one byte per token (`compute_logit_bias`), and every token it
  allows passes the engine's per-token check while sampled refused ones fail it."""
  model, vocabulary = chat
  V = model.config.vocab_size
  rng = random.Random(0)
  prefixes = 0
  for walk in range(6):
    constraint = vocabulary.constraint(spec)
    for _ in range(12):
      mask = np.zeros(grammar.words(V), np.int32)
      if not constraint.fill(mask):
        break
      allowed = grammar.unpack(mask[None], V)[0]
      reference = constraint.byte_mask()
      np.testing.assert_array_equal(allowed, reference)
      eos = model.tokenizer.eos_id
      assert allowed[eos] == constraint.accepting
      ids = [t for t in np.nonzero(allowed)[0].tolist() if t != eos]
      refused = [t for t in np.nonzero(~allowed)[0].tolist() if t != eos]
      assert all(constraint.allows(t) for t in rng.sample(ids, min(20, len(ids))))
      if not constraint.forced_bytes():  # (forced text: non-canonical spellings are refused)
        assert not any(constraint.allows(t) for t in rng.sample(refused, 20))
      prefixes += 1
      if not ids:
        break
      assert constraint.consume(rng.choice(ids))
  assert prefixes >= 12


def random_schema(rng: random.Random, depth: int = 0) -> dict:
  """A JSON schema whose every instance is short (bounded strings, arrays and integers), so a
  random model at temperature 1 finishes it within the token budget."""
  kinds = ["string", "integer", "boolean", "enum", "null"] + (["object", "array"] if depth < 2
                                                               else [])
  kind = rng.choice(kinds)
  if kind == "string":
    return {"type": "string", "maxLength": rng.randint(0, 6)}
  if kind == "integer":
    low = rng.randint(-50, 50)
    return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 200)}
  if kind == "enum":
    return {"enum": rng.sample(["red", "green", "blue", 3, True, None], rng.randint(1, 4))}
  if kind == "array":
    return {"type": "array", "items": random_schema(rng, depth + 1), "maxItems": rng.randint(0, 3)}
  if kind == "object":
    names = rng.sample(["id", "name", "tags", "ok", "n", "x"], rng.randint(1, 3))
    return {"type": "object", "properties": {n: random_schema(rng, depth + 1) for n in names},
            "required": rng.sample(names, rng.randint(0, len(names))),
            "additionalProperties": False}
  return {"type": kind}


def _engine(model, speculative_k=0):
  config = engine_lib.EngineConfig(max_slots=8, num_pages=96, page_size=16,
                                   speculative_k=speculative_k)
  return engine_lib.Engine(model.graphdef, model.params, config, eos_id=model.tokenizer.eos_id,
                           decode=model.tokenizer.decode)


def test_sampled_outputs_always_validate_against_random_schemas(chat):
  """24 random schemas (objects, arrays, enums, bounded strings and integers), each sampled at
  temperature 1 beside free-text requests: every constrained output parses and validates,
  ends with "stop", and the free-text neighbours are unaffected."""
  model, vocabulary = chat
  rng = random.Random(1)
  schemas = [{"type": "object", "properties": {"value": random_schema(rng)},
              "required": ["value"], "additionalProperties": False} for _ in range(24)]
  engine = _engine(model)
  prompt = model.chat_ids([{"role": "user", "content": "Answer in JSON."}])
  free = [engine.submit(prompt, sampling.SamplingParams(temperature=1.0, seed=s, max_tokens=24))
          for s in range(2)]
  requests = [engine.submit(prompt, sampling.SamplingParams(temperature=1.0, seed=i,
                                                            max_tokens=120),
                            constraint=vocabulary.constraint(
                                grammar.GrammarSpec("json_schema", schema)))
              for i, schema in enumerate(schemas)]
  engine.run_until_idle()
  for schema, r in zip(schemas, requests):
    text = model.tokenizer.decode(r.tokens)
    assert r.finish_reason == "stop", (schema, text)
    jsonschema.validate(json.loads(text), schema)
  # The free-text requests drew as if alone (the mask rows of unconstrained slots allow all).
  alone = _engine(model)
  for r in free:
    again = engine_lib.generate_all(alone, [prompt], [r.params])[0]
    assert again.tokens == r.tokens


def test_regex_lark_and_choice_outputs_match_and_speculation_changes_nothing(chat):
  """Constrained decoding, greedy and sampled, equals itself token for token with an 8-slot
  speculative engine, whose constrained rows propose what their grammar forces and prompt
  lookup's continuation, checked against the grammar (some kept: fewer steps), while their
  unconstrained neighbour drafts as usual; every output matches its regex, Lark grammar,
  choice or schema."""
  model, vocabulary = chat
  prompt = model.chat_ids([{"role": "user", "content": "An address?"}])
  specs = [grammar.GrammarSpec("regex", r"([0-9]{1,3}\.){3}[0-9]{1,3}"),
           grammar.GrammarSpec("lark", 'start: "say " word ("," word)*\nword: /[a-z]{1,5}/'),
           grammar.GrammarSpec("choice", CHOICES),
           grammar.GrammarSpec("json_object"),
           grammar.GrammarSpec("json_schema", {
               "type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                "zip": {"type": "integer"}},
               "required": ["city", "zip"], "additionalProperties": False})]
  results, steps = [], []
  for k in (0, 3):
    engine = _engine(model, speculative_k=k)
    reqs = [engine.submit(prompt, sampling.SamplingParams(temperature=t, seed=i, max_tokens=40),
                          constraint=vocabulary.constraint(spec))
            for i, spec in enumerate(specs) for t in (0.0, 1.0)]
    reqs.append(engine.submit(prompt, sampling.SamplingParams(max_tokens=12)))
    engine.run_until_idle()
    results.append([(r.tokens, r.finish_reason) for r in reqs])
    steps.append(engine.stats["decode_steps"])
    if k:
      assert engine.stats["speculative_proposed"] > engine.stats["grammar_proposed"] > 0
      assert engine.stats["grammar_accepted"] > 0
  assert results[0] == results[1]
  assert steps[1] < steps[0]
  texts = [model.tokenizer.decode(t) for t, _ in results[0][:-1]]
  reasons = [f for _, f in results[0][:-1]]
  assert all(re.fullmatch(r"([0-9]{1,3}\.){3}[0-9]{1,3}", t) for t in texts[0:2]), texts[0:2]
  assert all(re.fullmatch(r"say [a-z]{1,5}(,[a-z]{1,5})*", t) for t in texts[2:4]), texts[2:4]
  assert all(t in CHOICES for t in texts[4:6]) and reasons[4:6] == ["stop", "stop"], texts[4:6]
  for t, f in zip(texts[6:8], reasons[6:8]):  # any object, or cut by max_tokens
    assert f == "length" or isinstance(json.loads(t), dict), t
  for t, f in zip(texts[8:10], reasons[8:10]):  # the schema's keys (forced: kept proposals)
    assert f == "length" or set(json.loads(t)) == {"city", "zip"}, t


def test_bad_grammars_fail_in_one_line(chat):
  _, vocabulary = chat
  bad = [(grammar.GrammarSpec("json_schema", {"type": "strin"}), "Invalid type"),
         (grammar.GrammarSpec("json_schema", {"not": {"type": "string"}}), "not"),
         (grammar.GrammarSpec("json_schema", {"$ref": "#/nowhere"}), "nowhere"),
         (grammar.GrammarSpec("json_schema", "{}"), "JSON object"),
         (grammar.GrammarSpec("regex", "a(b"), "unclosed group"),
         (grammar.GrammarSpec("lark", "start: nothing"), "unknown name"),
         (grammar.GrammarSpec("choice", []), "non-empty list"),
         (grammar.GrammarSpec("yaml", "x"), "is not one of"),
         (grammar.GrammarSpec("regex", "a" * (grammar.MAX_SOURCE_CHARS + 1)), "at most")]
  for spec, reason in bad:
    with pytest.raises(ValueError, match=re.escape(reason)) as e:
      vocabulary.compile(spec)
    assert "\n" not in str(e.value)


def test_a_dead_end_grammar_ends_its_request():
  """A vocabulary of letters has no token for "0": the regex "ab0" lets the model write "ab",
  then allows nothing; that request ends with grammar_dead_end after its two tokens, and its
  neighbour runs on."""
  from jaxllm.model import transformer
  from tests.helpers import tiny_model
  pieces = ["<s>", "</s>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + [" ", "."]
  tok = tokenizer_lib.HFTokenizer(tokenizer_lib.tokenizer_from_gguf_vocab(
      pieces, [], [3, 3] + [1] * 28, "gpt2"), bos_id=0, eos_id=1)
  graphdef, params = transformer.split(transformer.create(
      tiny_model(vocab_size=32, max_seq_len=64), 0))
  vocabulary = grammar.Vocabulary(tok, 32)
  engine = engine_lib.Engine(graphdef, params, engine_lib.EngineConfig(
      max_slots=2, num_pages=16, page_size=16), eos_id=1, decode=tok.decode)
  dead = engine.submit([0, 5], sampling.SamplingParams(max_tokens=8), constraint=grammar.Constraint(
      vocabulary, grammar.grammar_text(grammar.GrammarSpec("regex", "ab0"))))
  free = engine.submit([0, 5], sampling.SamplingParams(max_tokens=8, temperature=1.0))
  engine.run_until_idle()
  assert (dead.finish_reason, tok.decode(dead.tokens)) == ("grammar_dead_end", "ab")
  assert free.finish_reason in ("length", "stop") and free.tokens
