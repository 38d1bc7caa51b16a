"""Chat templates: the jinja2 template stored with a model, rendered as transformers does."""

from __future__ import annotations

from typing import Any


def render(template: str, messages: list[dict], tokenizer: Any,
           add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
  """The prompt text for `messages` ([{"role", "content"}, ...]) under `template`; `tools`
  (OpenAI tool definitions) reach the template as `tools`, as transformers passes them."""
  from jinja2 import TemplateError
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def raise_exception(message):
    raise TemplateError(message)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  env.globals["raise_exception"] = raise_exception
  piece = lambda i: (tokenizer.decode([i]) if i is not None and i >= 0 else "")
  try:
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
        bos_token=piece(tokenizer.bos_id), eos_token=piece(tokenizer.eos_id))
  except TemplateError as e:
    raise ValueError(f"chat template failed: {e}") from None
