"""POST /v1/chat/completions: messages rendered with the model's chat template (or the config's override; never a
request's, since a template is code), and chat's logprobs format."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from jinja2 import TemplateError, TemplateSyntaxError
from litestar import Request, Response, post

from appliance.errors import APIError
from appliance.openai.logprobs import chat_logprobs
from appliance.openai.protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion,
                                       ChatCompletionChunk, ChatCompletionRequest, ChatMessage, Delta, Usage, now)
from appliance.openai.serving import (Prompt, check_limits, collect, open_model, read_request, sampling_params,
                                      server_config, start, stream_response)
from appliance.supervisor import ModelRuntime
from engine.output_processor import CompletionOutput, RequestOutput
from engine.tokenizer import render_chat


@post("/v1/chat/completions", status_code=200)
async def create_chat_completion(request: Request) -> Response:
    req: ChatCompletionRequest = await read_request(request, ChatCompletionRequest)
    if req.chat_template is not None:
        raise APIError.invalid("chat_template", "requests cannot supply a chat template; the server's operator "
                                                "configures it per model")
    messages = chat_messages(req.messages)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError.invalid("top_logprobs", "top_logprobs requires logprobs: true")
    max_tokens = (("max_completion_tokens", req.max_completion_tokens) if req.max_completion_tokens is not None
                  else ("max_tokens", req.max_tokens))
    server = server_config(request)
    check_limits(server, req, max_tokens=max_tokens, logprobs=("top_logprobs", req.top_logprobs),
                 prompt_chars=("messages", sum(len(m["content"]) for m in messages)))
    model, client = open_model(request, req.model)
    num_logprobs = (req.top_logprobs or 0) if req.logprobs else None
    # Chat's default is "as many as fit": the server's cap, which the engine lowers to what the context leaves.
    params = sampling_params(req, model.spec, max_tokens=max_tokens[1], default_max_tokens=server.max_tokens,
                             logprobs=num_logprobs)
    prompt = await asyncio.to_thread(render_prompt, model, messages, req.add_generation_prompt)
    generation = start(request, model, client, [prompt], params, "messages", req.priority)
    choices = _Choices(req.model, model.tokenizer, num_logprobs)
    if req.stream:
        return stream_response(generation, choices.chunk, choices.usage_chunk if req.include_usage else None)
    outputs = await collect(request, generation)
    return Response(choices.response(outputs[0], generation.usage()))


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """The messages as the template sees them; text parts are joined, as vLLM does."""
    if not messages:
        raise APIError.invalid("messages", "at least one message is required")
    result = []
    for i, m in enumerate(messages):
        if m.content is None and m.role != "assistant":  # an assistant turn may carry only tool calls
            raise APIError.invalid(f"messages[{i}].content", f"a {m.role} message needs content")
        content = m.content if isinstance(m.content, str) else "\n".join(p.text for p in m.content or [])
        message = {"role": m.role, "content": content}
        for key in ("name", "tool_call_id"):
            if getattr(m, key) is not None:
                message[key] = getattr(m, key)
        result.append(message)
    return result


def render_prompt(model: ModelRuntime, messages: list[dict[str, str]], add_generation_prompt: bool) -> Prompt:
    """Renders and tokenizes a conversation; blocking, so callers run it in a worker thread."""
    template = model.spec.chat_template
    if template is not None and template.endswith(".jinja"):
        template = Path(template).read_text()  # read each time, so that an edited file applies on reload
    try:
        text = render_chat(model.tokenizer, messages, template, add_generation_prompt)
    except TemplateSyntaxError:
        raise  # the operator's template is broken: a server error, logged
    except (ValueError, TemplateError) as e:  # no template, or the template refused these messages
        raise APIError.invalid("messages", f"cannot apply the chat template: {e}") from None
    return text, model.tokenizer.encode(text, add_special_tokens=False)


class _Choices:
    def __init__(self, model: str, tokenizer, num_logprobs: int | None):
        self.id, self.created, self.model = f"chatcmpl-{uuid.uuid4().hex}", now(), model
        self.tokenizer, self.num_logprobs = tokenizer, num_logprobs
        self._started: set[int] = set()  # choices whose first chunk (the one naming the role) went out

    def response(self, output: RequestOutput, usage: Usage) -> ChatCompletion:
        choices = [ChatChoice(c.index, AssistantMessage(c.text), self._logprobs(c.logprobs), c.finish_reason,
                              c.stop_reason) for c in output.outputs]
        return ChatCompletion(self.id, self.created, self.model, choices, usage)

    def chunk(self, choice: int, completion: CompletionOutput, output: RequestOutput) -> ChatCompletionChunk:
        delta = Delta(role=None if choice in self._started else "assistant", content=completion.delta_text)
        self._started.add(choice)
        return ChatCompletionChunk(self.id, self.created, self.model, [ChatChunkChoice(
            choice, delta, self._logprobs(completion.delta_logprobs), completion.finish_reason,
            completion.stop_reason)])

    def usage_chunk(self, usage: Usage) -> ChatCompletionChunk:
        return ChatCompletionChunk(self.id, self.created, self.model, [], usage)

    def _logprobs(self, entries):
        return None if self.num_logprobs is None else chat_logprobs(self.tokenizer, entries or [],
                                                                    self.num_logprobs)
