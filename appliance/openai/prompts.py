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
from engine.sampling_params import InvalidParameterError
from engine.tokenizer import render_chat

Prompt = tuple[str | None, list[int]]  # (text if known, token ids)


def check_continuation(messages: list[dict], add_generation_prompt: bool,
                       continue_final_message: bool) -> None:
    """vLLM's rules for continuing the last message rather than answering it."""
    if not continue_final_message:
        return
    if add_generation_prompt:
        raise APIError.invalid("continue_final_message", "continue_final_message needs add_generation_prompt: "
                                                         "false (a reply cannot also continue the last message)")
    if messages[-1]["role"] != "assistant":
        raise APIError.invalid("continue_final_message", "continue_final_message needs an assistant message last")


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
                  tools: list[dict] | None = None, **options) -> Prompt:
    """Renders and tokenizes a conversation; blocking. `tools` and `options` (`render_chat`'s
    continue_final_message, documents, template_kwargs such as enable_thinking) reach the template."""
    template = model.spec.chat_template
    if template is not None:
        template = template_text(model)
    try:
        text = render_chat(model.tokenizer, messages, template, add_generation_prompt, tools=tools, **options)
    except (TemplateSyntaxError, InvalidParameterError):
        raise  # the operator's template is broken (a server error, logged), or a request's kwarg named its param
    except (ValueError, TemplateError, TypeError) as e:  # no template, or it refused these messages (or kwargs)
        raise APIError.invalid("messages", f"cannot apply the chat template: {e}") from None
    return text, model.tokenizer.encode(text, add_special_tokens=False)


def prompt_inputs(prompt: str | list, param: str = "prompt") -> list[str | list[int]]:
    """A completions request's `prompt` (an embeddings request's `input`: `param`) as a list of prompts, each text
    or token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [prompt]
    if prompt and (all(isinstance(p, str) for p in prompt) or all(isinstance(p, list) for p in prompt)):
        return list(prompt)
    raise APIError.invalid(param, "expected a string, a list of strings, a list of token ids or a list of "
                                     "token-id lists, none of them empty")


def truncate(prompts: list[Prompt], num_tokens: int | None, tokenizer) -> list[Prompt]:
    """Each prompt's last `num_tokens` tokens (vLLM's `truncate_prompt_tokens`), its text decoded again if it had
    some (an echo shows what the model saw). Blocking."""
    if num_tokens is None:
        return prompts
    return [(text if len(ids) <= num_tokens or text is None else tokenizer.decode(ids[-num_tokens:]),
             ids[-num_tokens:]) for text, ids in prompts]


def tokenize_inputs(tokenizer, inputs: list[str | list[int]], echo: bool) -> list[Prompt]:
    """Text prompts tokenized; token-id prompts get their text only when it is to be echoed. Blocking."""
    return [(p, tokenizer.encode(p)) if isinstance(p, str) else (tokenizer.decode(p) if echo else None, p)
            for p in inputs]
