"""A streamed Responses API reply: OpenAI's typed server-sent events, each `event: <type>` with its JSON and a
`sequence_number`.

response.created, response.in_progress; then per output item, in the order the model writes them: a reasoning item
(response.reasoning_text.delta ... .done), a message (response.content_part.added, response.output_text.delta ...
.done, response.content_part.done) or a function call (response.function_call_arguments.delta ... .done), each
between response.output_item.added and response.output_item.done; then response.completed (response.incomplete when
max_output_tokens cut it short). A failure mid-stream sends an `error` event and response.failed.

The chat reply shaper (`appliance.openai.chat_reply`) splits the text into reasoning, content and tool-call deltas;
this module only turns those into items and events.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
from litestar.background_tasks import BackgroundTask
from litestar.response import Stream

from appliance.errors import APIError, to_api_error
from appliance.openai.chat_reply import ReplyShaper
from appliance.openai.generation import Generation
from appliance.openai.protocol import Delta
from appliance.openai.responses_output import Responder, item_id, status_of
from appliance.openai.responses_protocol import (FunctionCallItem, OutputItem, OutputMessage, OutputText,
                                                 ReasoningItem, ReasoningText)

_encoder = msgspec.json.Encoder()


class ResponseEvents:
    """The events of one reply, built from the shaper's deltas."""

    def __init__(self, responder: Responder):
        self.responder = responder
        self.items: list[OutputItem] = []
        self._sequence = 0
        self._open: int | None = None  # the reasoning or message item being written
        self._text = ""  # its text so far
        self._calls: dict[int, int] = {}  # the shaper's tool-call index -> output index

    def event(self, type_: str, **fields) -> bytes:
        payload = {"type": type_, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return b"event: " + type_.encode() + b"\ndata: " + _encoder.encode(payload) + b"\n\n"

    def start(self) -> bytes:
        response = self.responder.response("in_progress", [])
        return self.event("response.created", response=response) + self.event("response.in_progress",
                                                                                 response=response)

    def delta(self, delta: Delta) -> bytes:
        out = b""
        if delta.reasoning_content:
            out += self._write(ReasoningItem, delta.reasoning_content)
        if delta.content:
            out += self._write(OutputMessage, delta.content)
        for call in delta.tool_calls or []:
            if call.id is not None:
                out += self._close("completed")
                self._calls[call.index] = len(self.items)
                out += self._add(FunctionCallItem(id=item_id("fc"), call_id=call.id, name=call.function["name"],
                                                  arguments="", status="in_progress"))
            arguments = (call.function or {}).get("arguments")
            if arguments:
                index = self._calls[call.index]
                self.items[index].arguments += arguments
                out += self.event("response.function_call_arguments.delta", item_id=self.items[index].id,
                                  output_index=index, delta=arguments)
        return out

    def finish(self, finish_reason: str | None, usage) -> bytes:
        status = status_of(finish_reason)
        out = self._write(OutputMessage, "") if not self.items else b""  # an empty reply is still a message
        out += self._close(status)
        for index in self._calls.values():
            item = self.items[index]
            item.status = status
            out += self.event("response.function_call_arguments.done", item_id=item.id, output_index=index,
                              name=item.name, arguments=item.arguments)
            out += self.event("response.output_item.done", output_index=index, item=item)
        response = self.responder.finish(self.items, finish_reason, usage)
        return out + self.event("response.completed" if status == "completed" else "response.incomplete",
                                response=response)

    def failed(self, error: APIError) -> bytes:
        detail = {"code": error.code or error.type, "message": error.message}
        return self.event("error", code=error.code, message=error.message, param=error.param) + self.event(
            "response.failed", response=self.responder.response("failed", self.items, error=detail))

    def _write(self, kind: type, text: str) -> bytes:
        out = b""
        if self._open is None or not isinstance(self.items[self._open], kind):
            out += self._close("completed")
            self._open, self._text = len(self.items), ""
            if kind is ReasoningItem:
                out += self._add(ReasoningItem(id=item_id("rs"), content=[], status="in_progress"))
                part = ReasoningText(text="")
            else:
                out += self._add(OutputMessage(id=item_id("msg"), status="in_progress", content=[]))
                part = OutputText(text="")
            out += self.event("response.content_part.added", **self._where(), part=part)
        self._text += text
        name = "response.reasoning_text.delta" if kind is ReasoningItem else "response.output_text.delta"
        extra = {} if kind is ReasoningItem else {"logprobs": []}
        return out + self.event(name, **self._where(), delta=text, **extra)

    def _close(self, status: str) -> bytes:
        """Ends the reasoning or message item being written, if any."""
        if self._open is None:
            return b""
        item, where = self.items[self._open], self._where()
        if isinstance(item, ReasoningItem):
            part = ReasoningText(text=self._text)
            out = self.event("response.reasoning_text.done", **where, text=self._text)
        else:
            part = OutputText(text=self._text)
            out = self.event("response.output_text.done", **where, text=self._text, logprobs=[])
        item.content, item.status = [part], status
        out += self.event("response.content_part.done", **where, part=part)
        out += self.event("response.output_item.done", output_index=self._open, item=item)
        self._open = None
        return out

    def _add(self, item: OutputItem) -> bytes:
        self.items.append(item)
        return self.event("response.output_item.added", output_index=len(self.items) - 1, item=item)

    def _where(self) -> dict:
        return {"item_id": self.items[self._open].id, "output_index": self._open, "content_index": 0}


def stream(responder: Responder, generation: Generation, shaper: ReplyShaper) -> Stream:
    events = ResponseEvents(responder)

    async def body() -> AsyncIterator[bytes]:
        try:
            yield events.start()
            async for batch in generation.outputs():
                for _, output in batch:
                    completion = output.outputs[0]
                    if not completion.finished and not completion.delta_text:
                        continue  # text held back (a possible stop string, a split character)
                    delta, finish_reason = shaper.delta(0, completion.delta_text, completion.finish_reason, None)
                    out = events.delta(delta)
                    if completion.finished:
                        out += events.finish(finish_reason, generation.usage())
                    yield out
        except Exception as e:
            yield events.failed(to_api_error(e))
        finally:
            await generation.aclose()

    # As chat's stream: litestar cancels the iteration on disconnect, the background task aborts the engine work.
    return Stream(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                  background=BackgroundTask(generation.aclose))
