"""A streamed Responses API reply: OpenAI's typed server-sent events, each `event: <type>` with its JSON and a
`sequence_number`.

response.created, response.in_progress; then per output item, in the order the model writes them: a reasoning item
(response.reasoning_text.delta ... .done), a message (response.content_part.added, response.output_text.delta ...
.done, response.content_part.done) or a function call (response.function_call_arguments.delta ... .done), each
between response.output_item.added and response.output_item.done; then response.completed (response.incomplete when
max_output_tokens cut it short). A failure mid-stream sends an `error` event and response.failed. With
`include: ["message.output_text.logprobs"]` each output_text delta carries the logprobs of the tokens behind it
(tokens whose text is held back travel with the next text delta; the end-of-text token's with an empty last delta),
and the done events and the final output_text part all of them; a reasoning or tool-call delta's tokens are not the
message's. (Not streamed, the output_text part carries every generated token's, reasoning and calls too, as vLLM's.)

`GET /v1/responses/{id}?stream=true` replays a stored response as the same events (`replay`), one delta per item.

The chat reply shaper (`appliance.openai.chat_reply`) splits the text into reasoning, content and tool-call deltas;
this module only turns those into items and events.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import msgspec
from litestar.background_tasks import BackgroundTask
from litestar.response import Stream

from appliance.errors import APIError, to_api_error
from appliance.openai.chat_reply import ReplyShaper
from appliance.openai.generation import Generation
from appliance.openai.logprobs import chat_logprobs
from appliance.openai.protocol import Delta, TokenLogprob, ToolCallDelta
from appliance.openai.responses_output import Responder, item_id, status_of
from appliance.openai.responses_protocol import (FunctionCallItem, OutputItem, OutputMessage, OutputText,
                                                 ReasoningItem, ReasoningText, ResponseObject)

_encoder = msgspec.json.Encoder()


class ResponseEvents:
    """The events of one reply, built from the shaper's deltas. `new_id` names each item as it opens (a replay
    passes the stored items' ids)."""

    def __init__(self, in_progress: ResponseObject, new_id: Callable[[str], str] = item_id):
        self.in_progress, self.new_id = in_progress, new_id
        self.items: list[OutputItem] = []
        self._sequence = 0
        self._open: int | None = None  # the reasoning or message item being written
        self._text = ""  # its text so far
        self._logprobs: list[TokenLogprob] = []  # a message's so far
        self._calls: dict[int, int] = {}  # the shaper's tool-call index -> output index

    def event(self, type_: str, **fields) -> bytes:
        payload = {"type": type_, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return b"event: " + type_.encode() + b"\ndata: " + _encoder.encode(payload) + b"\n\n"

    def start(self) -> bytes:
        return self.event("response.created", response=self.in_progress) + self.event(
            "response.in_progress", response=self.in_progress)

    def delta(self, delta: Delta, logprobs: list[TokenLogprob] | None = None) -> bytes:
        """`logprobs`: those of the tokens behind the delta's content, when the request included them."""
        out = b""
        if delta.reasoning_content:
            out += self._write(ReasoningItem, delta.reasoning_content)
        if delta.content or logprobs and (not self.items or isinstance(self.items[-1], OutputMessage)):
            out += self._write(OutputMessage, delta.content or "", logprobs or [])  # also an empty last delta
        for call in delta.tool_calls or []:
            if call.id is not None:
                out += self._close("completed")
                self._calls[call.index] = len(self.items)
                out += self._add(FunctionCallItem(id=self.new_id("fc"), call_id=call.id,
                                                  name=call.function["name"], arguments="", status="in_progress"))
            arguments = (call.function or {}).get("arguments")
            if arguments:
                index = self._calls[call.index]
                self.items[index].arguments += arguments
                out += self.event("response.function_call_arguments.delta", item_id=self.items[index].id,
                                  output_index=index, delta=arguments)
        return out

    def close(self, status: str) -> bytes:
        """Every item's done events, with the reply's final status."""
        out = self._write(OutputMessage, "") if not self.items else b""  # an empty reply is still a message
        out += self._close(status)
        for index in self._calls.values():
            item = self.items[index]
            item.status = status
            out += self.event("response.function_call_arguments.done", item_id=item.id, output_index=index,
                              name=item.name, arguments=item.arguments)
            out += self.event("response.output_item.done", output_index=index, item=item)
        return out

    def end(self, response: ResponseObject) -> bytes:
        return self.event(f"response.{response.status}", response=response)

    def failed(self, error: APIError) -> bytes:
        detail = {"code": error.code or error.type, "message": error.message}
        return self.event("error", code=error.code, message=error.message, param=error.param) + self.event(
            "response.failed", response=msgspec.structs.replace(self.in_progress, status="failed",
                                                                output=self.items, error=detail))

    def _write(self, kind: type, text: str, logprobs: list[TokenLogprob] = ()) -> bytes:
        out = b""
        if self._open is None or not isinstance(self.items[self._open], kind):
            out += self._close("completed")
            self._open, self._text, self._logprobs = len(self.items), "", []
            if kind is ReasoningItem:
                out += self._add(ReasoningItem(id=self.new_id("rs"), content=[], status="in_progress"))
                part = ReasoningText(text="")
            else:
                out += self._add(OutputMessage(id=self.new_id("msg"), status="in_progress", content=[]))
                part = OutputText(text="")
            out += self.event("response.content_part.added", **self._where(), part=part)
        self._text += text
        if kind is ReasoningItem:
            return out + self.event("response.reasoning_text.delta", **self._where(), delta=text)
        self._logprobs.extend(logprobs)
        return out + self.event("response.output_text.delta", **self._where(), delta=text, logprobs=logprobs)

    def _close(self, status: str) -> bytes:
        """Ends the reasoning or message item being written, if any."""
        if self._open is None:
            return b""
        item, where = self.items[self._open], self._where()
        if isinstance(item, ReasoningItem):
            part = ReasoningText(text=self._text)
            out = self.event("response.reasoning_text.done", **where, text=self._text)
        else:
            part = OutputText(text=self._text, logprobs=self._logprobs)
            out = self.event("response.output_text.done", **where, text=self._text, logprobs=self._logprobs)
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


def stream(responder: Responder, generation: Generation, shaper: ReplyShaper, num_logprobs: int | None) -> Stream:
    events = ResponseEvents(responder.response("in_progress", []))
    tokenizer = responder.tokenizer

    async def body() -> AsyncIterator[bytes]:
        pending: list = []  # logprobs of tokens whose text is held back or not yet given to a text delta
        try:
            yield events.start()
            async for batch in generation.outputs():
                for _, output in batch:
                    completion = output.outputs[0]
                    pending.extend(completion.delta_logprobs or [])
                    if not completion.finished and not completion.delta_text:
                        continue  # text held back (a possible stop string, a split character)
                    delta, finish_reason = shaper.delta(0, completion.delta_text, completion.finish_reason, None)
                    logprobs = None
                    if num_logprobs is not None and (delta.content or completion.finished):
                        logprobs = chat_logprobs(tokenizer, pending, num_logprobs).content
                    if delta.content or delta.reasoning_content or delta.tool_calls or completion.finished:
                        pending = []  # a reasoning or tool-call delta's tokens are not the message's
                    out = events.delta(delta, logprobs)
                    if completion.finished:
                        out += events.close(status_of(finish_reason))
                        out += events.end(responder.finish(events.items, finish_reason, generation.usage()))
                    yield out
        except Exception as e:
            yield events.failed(to_api_error(e))
        finally:
            await generation.aclose()

    # As chat's stream: litestar cancels the iteration on disconnect, the background task aborts the engine work.
    return Stream(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                  background=BackgroundTask(generation.aclose))


def replay(response: ResponseObject, starting_after: int | None) -> Stream:
    """A stored response as the events a stream of it sends (one delta per item), those numbered after
    `starting_after` only."""
    ids = iter([item.id for item in response.output])
    events = ResponseEvents(msgspec.structs.replace(response, status="in_progress", output=[], usage=None,
                                                    incomplete_details=None), lambda _: next(ids))
    chunks = [events.start()]
    for index, item in enumerate(response.output):
        if isinstance(item, ReasoningItem):
            chunks.append(events.delta(Delta(reasoning_content=item.content[0].text)))
        elif isinstance(item, OutputMessage):
            chunks.append(events.delta(Delta(content=item.content[0].text), item.content[0].logprobs))
        else:
            chunks.append(events.delta(Delta(tool_calls=[ToolCallDelta(index, item.call_id, "function", {
                "name": item.name, "arguments": item.arguments})])))
    chunks += [events.close("incomplete" if response.status == "incomplete" else "completed"), events.end(response)]
    frames = b"".join(chunks).split(b"\n\n")[:-1]
    skip = 0 if starting_after is None else starting_after + 1
    return Stream([frame + b"\n\n" for frame in frames[skip:]], media_type="text/event-stream",
                  headers={"Cache-Control": "no-cache"})
