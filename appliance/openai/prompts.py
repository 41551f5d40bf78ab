"""From a request's messages or prompts to token ids: chat messages checked and rendered with the model's chat
template (or the config's override; never a request's, since a template is code), and completions' prompt forms.
Shared by chat, completions and tokenize; the blocking parts run in worker threads (their callers see to that)."""

from __future__ import annotations

import json
from pathlib import Path

from jinja2 import TemplateError, TemplateSyntaxError

from appliance.errors import APIError
from appliance.openai.protocol import ChatMessage
from appliance.supervisor import ModelRuntime
from engine.tokenizer import render_chat

Prompt = tuple[str | None, list[int]]  # (text if known, token ids)


def chat_messages(messages: list[ChatMessage]) -> list[dict]:
    """The messages as the template sees them; text parts are joined, as vLLM does. An assistant turn's tool calls
    carry their arguments as an object (templates write them with `tojson`), or as sent when not JSON."""
    if not messages:
        raise APIError.invalid("messages", "at least one message is required")
    result = []
    for i, m in enumerate(messages):
        if m.content is None and m.role != "assistant":  # an assistant turn may carry only tool calls
            raise APIError.invalid(f"messages[{i}].content", f"a {m.role} message needs content")
        content = m.content if isinstance(m.content, str) else "\n".join(p.text for p in m.content or [])
        message = {"role": m.role, "content": content}
        for key in ("name", "tool_call_id", "reasoning_content"):
            if getattr(m, key) is not None:
                message[key] = getattr(m, key)
        if m.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _arguments(c.function.arguments)}} for c in m.tool_calls]
        result.append(message)
    return result


def _arguments(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def template_text(model: ModelRuntime) -> str | None:
    """The chat template in force: the config's (a file read each time, so that an edited one applies on reload),
    else the model's."""
    template = model.spec.chat_template
    if template is not None and template.endswith(".jinja"):
        return Path(template).read_text()
    return template if template is not None else model.tokenizer.chat_template


def render_prompt(model: ModelRuntime, messages: list[dict], add_generation_prompt: bool,
                  tools: list[dict] | None = None, template_kwargs: dict | None = None) -> Prompt:
    """Renders and tokenizes a conversation; blocking. `tools` and `template_kwargs` (chat_template_kwargs, e.g.
    enable_thinking) become template variables."""
    template = model.spec.chat_template
    if template is not None:
        template = template_text(model)
    try:
        text = render_chat(model.tokenizer, messages, template, add_generation_prompt, tools, template_kwargs)
    except TemplateSyntaxError:
        raise  # the operator's template is broken: a server error, logged
    except (ValueError, TemplateError) as e:  # no template, or the template refused these messages
        raise APIError.invalid("messages", f"cannot apply the chat template: {e}") from None
    return text, model.tokenizer.encode(text, add_special_tokens=False)


def prompt_inputs(prompt: str | list) -> list[str | list[int]]:
    """A completions request's `prompt` as a list of prompts, each text or token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [prompt]
    if prompt and (all(isinstance(p, str) for p in prompt) or all(isinstance(p, list) for p in prompt)):
        return list(prompt)
    raise APIError.invalid("prompt", "expected a string, a list of strings, a list of token ids or a list of "
                                     "token-id lists, none of them empty")


def tokenize_inputs(tokenizer, inputs: list[str | list[int]], echo: bool) -> list[Prompt]:
    """Text prompts tokenized; token-id prompts get their text only when it is to be echoed. Blocking."""
    return [(p, tokenizer.encode(p)) if isinstance(p, str) else (tokenizer.decode(p) if echo else None, p)
            for p in inputs]
