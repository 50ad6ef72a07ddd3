"""Chat prompts for /v1/chat/completions: a model's chat template (Jinja, as in Hugging Face tokenizers) turns a list of
messages into one prompt string.

Where the template comes from, first match wins: `serving.chat_templates[<model>]` (the name of a built-in template
below, or a Jinja template string), then the `chat_template` shipped in the model folder (tokenizer_config.json or
chat_template.jinja, as `AutoTokenizer` reads it). A model with neither has no chat endpoint (400, as vLLM answers).
Templates render in jinja2's immutable sandbox with `messages`, `add_generation_prompt=True`, `bos_token` and
`eos_token`, as `transformers`' `apply_chat_template` does.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from textmill.serving.protocol import ApiError, ChatMessage, message_text

# "plain": one "role: content" paragraph per message, then "assistant:" for the model to continue. For base GPT-2
# models fine-tuned on plain text; pair it with a stop string such as "\nuser:" in requests.
BUILTIN_TEMPLATES = {
    "plain": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
             "{% if add_generation_prompt %}assistant:{% endif %}",
}


def template_for(model: str, shipped: str | None, configured: dict[str, str]) -> str:
    """The chat template for `model`; ApiError 400 when there is none."""
    template = configured.get(model)
    if template is not None:
        return BUILTIN_TEMPLATES.get(template, template)
    if shipped:
        return shipped
    raise ApiError(400, f"model {model!r} has no chat template, so /v1/chat/completions cannot format messages for it: "
                   f"its folder ships no chat_template (tokenizer_config.json) and serving.chat_templates has no entry "
                   f"for it. Use /v1/completions, or set serving.chat_templates.{model}=plain (see docs/serving.md)",
                   param="model", code="chat_template_missing")


def _raise_exception(message: str):
    raise TemplateError(message)


@lru_cache(maxsize=32)
def _compile(template: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception  # HF templates reject bad role orders through it
    return env.from_string(template)


def render(template: str, messages: list[ChatMessage], engine: Any, model: str) -> str:
    """The prompt for `messages` under `template`; ApiError 400 when the template fails (it may reject a role order)."""
    eos = engine.decode([engine.eot_id], skip_special_tokens=False)
    try:
        return _compile(template).render(messages=[{"role": m.role, "content": message_text(m.content)}
                                                   for m in messages],
                                         add_generation_prompt=True, bos_token=eos, eos_token=eos)
    except TemplateError as e:
        raise ApiError(400, f"the chat template of model {model!r} could not format these messages: {e}",
                       param="messages", code="chat_template_error") from None
