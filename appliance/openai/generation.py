"""One API request's run through the engine, and its answer: `Generation` (its engine requests, one per prompt,
read as one stream), `collect` (one JSON body) and `stream_response` (server-sent events).

Client disconnects abort the engine requests at once: litestar cancels a stream's iteration when the client goes
away (and the stream's background task closes the generation); for a plain response, `collect` watches the
connection itself, since litestar does not.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Sequence

import msgspec
from litestar import Request
from litestar.background_tasks import BackgroundTask
from litestar.response import Stream

from appliance import access_log
from appliance.engines import EngineClient, OutputSink
from appliance.errors import APIError, error_body, to_api_error
from appliance.metrics import Metrics
from appliance.openai.prompts import Prompt
from appliance.openai.protocol import PromptTokensDetails, Usage
from appliance.stats import StatsHub
from engine.contract import PoolingParams
from engine.output_processor import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams

logger = logging.getLogger("kvbox.api")
_encoder = msgspec.json.Encoder()


class Generation:
    """One API request's engine requests (one per prompt), started at once and read as one stream.

    Their outputs meet in one `OutputSink`, which the consumer empties a batch at a time: whatever the engine
    produced since the last batch, each engine request's updates merged into one. Closing the generation (`aclose`)
    aborts the engine requests still running.
    """

    def __init__(self, client: EngineClient, request_id: str, prompts: list[Prompt], params: SamplingParams, *,
                 metrics: Metrics, on_done: Callable[[], None], stats: StatsHub | None = None, priority: int = 0,
                 cache_salt: str | None = None, lora_name: str | None = None,
                 pooling: list[PoolingParams] | None = None, kv_parents: list[str | None] | None = None):
        """`kv_parents` (beam search's steps, one per prompt): each engine request keeps its K/V when it ends, and
        forks from its parent's kept K/V; the caller releases them (`client.release_kv(engine_request_ids)`)."""
        self.request_id = request_id
        self.client = client
        self.n = params.n
        self.latest: list[RequestOutput | None] = [None] * len(prompts)
        self._observers = [metrics.request(client.name, lora_name, params) for _ in prompts]
        self._sink = OutputSink(lambda index, output: self._observers[index].observe(output))
        self._on_done = on_done  # called once per engine request that ends, however it ends
        self._running = {i: f"{request_id}-{i}" for i in range(len(prompts))}  # prompt index -> engine request id
        self.engine_request_ids = list(self._running.values())
        access_log.note(model=client.name, adapter=lora_name)
        # The dashboard's row for this request and its latency samples.
        self._stats = None if stats is None else stats.begin(
            request_id, client.name, lora_name, len(prompts), prompts[0][0] if prompts else None)
        try:
            for i, (text, token_ids) in enumerate(prompts):
                client.add_request(self._running[i], text, token_ids, params, self._sink, i, priority, lora_name,
                                   pooling[i] if pooling is not None else None, cache_salt=cache_salt,
                                   kv_parent=kv_parents[i] if kv_parents is not None else None,
                                   keep_kv=kv_parents is not None)
        except BaseException:
            self._close()
            raise

    async def outputs(self) -> AsyncIterator[list[tuple[int, RequestOutput]]]:
        """Batches of (prompt index, snapshot) as the engine requests progress; raises the first failure, once
        the outputs that came before it are out."""
        while self._running:
            batch = []
            for index, item in await self._sink.take():
                error = item if isinstance(item, BaseException) else self._accept(index, item)
                if error is not None:
                    if batch:
                        yield batch
                    raise error
                batch.append((index, item))
            yield batch

    def usage(self) -> Usage:
        done = [o for o in self.latest if o is not None]
        num_prompt = sum(len(o.prompt_token_ids) for o in done)
        num_completion = sum(len(c.token_ids) for o in done for c in o.outputs)
        return Usage(num_prompt, num_completion, num_prompt + num_completion,
                     PromptTokensDetails(sum(o.num_cached_tokens for o in done)))

    async def aclose(self) -> None:
        self._close()

    def _accept(self, index: int, output: RequestOutput) -> APIError | None:
        """Keeps an update; returns the error it reports, if any."""
        if self._stats is not None:
            self._stats.observe(index, output)
        if output.finished:
            del self._running[index]
            self._on_done()
        if _failed(output):
            logger.error("request %s: %s[%d] failed while generating it", output.request_id, self.client.name,
                         self.client.replica)
            return APIError(500, "the engine failed while generating this request", code="engine_error")
        self.latest[index] = output
        return None

    def _close(self) -> None:
        """Aborts what still runs (nothing once all finished); safe to call more than once."""
        running, self._running = self._running, {}
        usage = self.usage()
        access_log.note(prompt_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens)
        if running:
            logger.info("request %s: aborted (%s)", self.request_id, ", ".join(running.values()))
        self.client.abort(list(running.values()))
        for index in running:
            self._observers[index].aborted()
            self._on_done()
        if self._stats is not None:
            self._stats.close(self._finish_reasons(running), aborted=bool(running))

    def _finish_reasons(self, aborted: dict[int, str]) -> list[str]:
        """Each sample's finish reason: an aborted prompt's samples 'abort', a failed one's (never kept) 'error'."""
        reasons = []
        for index, output in enumerate(self.latest):
            if index in aborted or output is None:
                reasons += ["abort" if index in aborted else "error"] * self.n
            else:
                reasons += [c.finish_reason or "abort" for c in output.outputs]
        return reasons


def _failed(output: RequestOutput) -> bool:
    for completion in output.outputs:
        if completion.finish_reason == "error":
            return True
    return False


async def collect(request: Request, generation: Generation) -> list[RequestOutput]:
    """Every prompt's final output. A client that disconnects first gets its engine requests aborted."""
    collecting = asyncio.ensure_future(_read_all(generation))
    disconnected = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait((collecting, disconnected), return_when=asyncio.FIRST_COMPLETED)
        if not collecting.done():
            raise APIError(499, "the client closed the connection", code="client_closed")
        collecting.result()
        return generation.latest
    finally:
        collecting.cancel()
        disconnected.cancel()
        await generation.aclose()


async def _read_all(generation: Generation) -> None:
    async for _ in generation.outputs():
        pass


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read, so the next ASGI message can only be the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


def stream_response(generation: Generation, render: Callable[[int, CompletionOutput, RequestOutput], msgspec.Struct],
                    usage_chunk: Callable[[Usage], msgspec.Struct] | None,
                    first: Sequence[msgspec.Struct] = ()) -> Stream:
    """Server-sent events: the `first` chunks (chat's role chunks), a chunk per update of each choice (under load
    one update carries several tokens), the usage chunk if asked, then `[DONE]`. A failure mid-stream (an engine
    that died) ends it with an error event; the HTTP status is already sent."""

    def render_batch(batch: list[tuple[int, RequestOutput]], finished: set[int]) -> bytes:
        return b"".join(_event(render(choice, completion, output)) for index, output in batch
                        for choice, completion in _moved_choices(generation.n, index, output, finished))

    async def events() -> AsyncIterator[bytes]:
        finished: set[int] = set()
        try:
            try:
                if first:
                    yield b"".join(map(_event, first))
                async for batch in generation.outputs():
                    # A batch's chunks go out in one write: the HTTP layer's cost is per write, hardly per byte.
                    if chunks := render_batch(batch, finished):
                        yield chunks
                if usage_chunk is not None:
                    yield _event(usage_chunk(generation.usage()))
            except Exception as e:
                error = to_api_error(e)
                logger.info("request %s: stream ended by an error: %s", generation.request_id, error.message)
                yield _event(error_body(error))
            yield b"data: [DONE]\n\n"
        finally:
            await generation.aclose()

    # litestar cancels the iteration on disconnect but never closes the iterator; the background task does, now
    # rather than at garbage collection, which is what aborts the engine requests.
    return Stream(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                  background=BackgroundTask(generation.aclose))


def _moved_choices(n: int, index: int, output: RequestOutput, finished: set[int]) -> Iterator[
        tuple[int, CompletionOutput]]:
    """(choice index, completion) for each completion of prompt `index` that this update moved; `finished`
    remembers the choices that already ended, which later snapshots keep showing."""
    for completion in output.outputs:
        choice = index * n + completion.index
        if choice in finished:
            continue
        if completion.finished:
            finished.add(choice)
        elif not completion.delta_text and not completion.delta_logprobs:
            continue  # tokens whose text is still held back (a possible stop string, a split character)
        yield choice, completion


def _event(payload: msgspec.Struct) -> bytes:
    return b"data: " + _encoder.encode(payload) + b"\n\n"
