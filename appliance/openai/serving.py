"""The request path that completions and chat share, in the order a request takes it.

read_request -> check_limits (before any tokenizing) -> open_model (route by name) -> sampling_params ->
[endpoint tokenizes or renders its prompt in a worker thread] -> start (context checks, admission, engine requests)
-> respond: `stream_response` (SSE) or `collect` (one JSON body).

Admission rule: a model takes at most `queue_cap + scheduler.max_num_seqs x replicas` engine requests at once
(running plus waiting; a completions request with several prompts counts one per prompt). Beyond that a request
gets 429 with Retry-After, before it costs the engine anything.

Client disconnects abort the engine requests at once: litestar cancels a stream's iteration when the client goes
away (and the stream's background task closes the generation); for a plain response, `collect` watches the
connection itself, since litestar does not.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator

import msgspec
from litestar import Request
from litestar.background_tasks import BackgroundTask
from litestar.response import Stream

from appliance.config import ModelSpec, ServerSpec
from appliance.engine_client import EngineClient, OutputSink
from appliance.errors import RETRY_QUEUE_FULL_S, RETRY_UNAVAILABLE_S, APIError, error_body, to_api_error
from appliance.metrics import Metrics
from appliance.openai.protocol import PromptTokensDetails, SamplingFields, Usage, decode
from appliance.stats import StatsHub
from appliance.supervisor import ModelRuntime, Supervisor
from engine.output_processor import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams

Prompt = tuple[str | None, list[int]]  # (text if known, token ids)

# Request fields that fall back to the model's configured `default_sampling` when a request leaves them out.
_DEFAULTABLE = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                "repetition_penalty")
_encoder = msgspec.json.Encoder()


async def read_request(request: Request, type_: type[msgspec.Struct]) -> msgspec.Struct:
    return decode(await request.body(), type_)


def server_config(request: Request) -> ServerSpec:
    return request.app.state.supervisor.config.server


def check_limits(server: ServerSpec, req: SamplingFields, *, max_tokens: tuple[str, int | None],
                 logprobs: tuple[str, int | None], prompt_chars: tuple[str, int]) -> None:
    """The server's caps, checked before tokenizing so that an oversized request costs nothing. Each argument is
    (the request's name for the field, its value)."""
    if req.n is not None and req.n > server.max_n:
        raise APIError.invalid("n", f"n is {req.n}; this server allows at most {server.max_n}")
    for (param, value), cap in ((max_tokens, server.max_tokens), (logprobs, server.max_logprobs)):
        if value is not None and value > cap:
            raise APIError.invalid(param, f"{param} is {value}; this server allows at most {cap}")
    stop = [req.stop] if isinstance(req.stop, str) else req.stop or []
    if len(stop) > server.max_stop_strings:
        raise APIError.invalid("stop", f"{len(stop)} stop strings; this server allows at most "
                                       f"{server.max_stop_strings}")
    if any(len(s) > server.max_stop_string_length for s in stop):
        raise APIError.invalid("stop", f"a stop string is longer than {server.max_stop_string_length} characters")
    param, num_chars = prompt_chars
    if num_chars > server.max_prompt_chars:
        raise APIError.invalid(param, f"the prompt has {num_chars} characters; this server allows at most "
                                      f"{server.max_prompt_chars}")


def open_model(request: Request, name: str) -> tuple[ModelRuntime, EngineClient]:
    """The model a request names, and the replica that will serve it. A LoRA adapter's name routes to its base
    model; the adapter is kept in `request.state.lora_name` for `start`."""
    supervisor: Supervisor = request.app.state.supervisor
    if supervisor.draining:
        raise APIError(503, "the server is shutting down", code="draining", retry_after=RETRY_UNAVAILABLE_S)
    model, request.state.lora_name = supervisor.resolve(name)
    return model, model.pick_replica()


def sampling_params(req: SamplingFields, spec: ModelSpec, *, max_tokens: int | None, default_max_tokens: int | None,
                    logprobs: int | None, prompt_logprobs: int | None = None) -> SamplingParams:
    """Request fields, else the model's configured defaults, else SamplingParams' own defaults."""
    defaults = spec.default_sampling
    options = {}
    for name in _DEFAULTABLE:
        value = getattr(req, name)
        if value is None and defaults is not None:
            value = getattr(defaults, name)
        if value is not None:
            options[name] = value
    if max_tokens is None and defaults is not None:
        max_tokens = defaults.max_tokens
    return SamplingParams(
        **options,
        n=1 if req.n is None else req.n,
        max_tokens=default_max_tokens if max_tokens is None else max_tokens,
        logit_bias=_logit_bias(req.logit_bias),
        seed=req.seed,
        stop=req.stop or [],
        stop_token_ids=req.stop_token_ids or [],
        ignore_eos=req.ignore_eos,
        min_tokens=req.min_tokens,
        include_stop_str_in_output=req.include_stop_str_in_output,
        skip_special_tokens=req.skip_special_tokens,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
    )


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    if not bias:
        return None
    try:
        return {int(token_id): value for token_id, value in bias.items()}
    except ValueError:
        raise APIError.invalid("logit_bias", "keys must be token ids (integers as strings)") from None


def start(request: Request, model: ModelRuntime, client: EngineClient, prompts: list[Prompt],
          params: SamplingParams, prompt_param: str, priority: int = 0) -> Generation:
    """Checks the prompts against the model, admits the request and starts its engine requests."""
    info = client.info
    for _, token_ids in prompts:
        if not token_ids:
            raise APIError.invalid(prompt_param, "the prompt is empty")
        if len(token_ids) >= info.max_model_len:
            raise APIError.invalid(prompt_param, f"the prompt has {len(token_ids)} tokens, but this model's context "
                                                 f"length is {info.max_model_len} (and at least one token must be "
                                                 f"generated)")
        if min(token_ids) < 0 or max(token_ids) >= info.vocab_size:
            raise APIError.invalid(prompt_param, f"token ids must be in [0, {info.vocab_size})")
    params.verify_for_model(info.vocab_size)
    admission: Admission = request.app.state.admission
    admission.acquire(model, len(prompts))
    return Generation(client, prompts, params, priority, request.app.state.metrics,
                      on_done=lambda: admission.release(model.name, 1), stats=request.app.state.get("stats"),
                      lora_name=request.state.get("lora_name"))


class Admission:
    """Counts each model's admitted engine requests, from admission to their end (see the module docstring).

    Counted here rather than read from the replicas because a request reaches its replica only after admission has
    returned: many requests admitted in one event-loop turn would all see the old count.
    """

    def __init__(self):
        self._counts: Counter[str] = Counter()

    def acquire(self, model: ModelRuntime, num: int) -> None:
        cap = model.spec.queue_cap + model.spec.scheduler.max_num_seqs * len(model.replicas)
        if self._counts[model.name] + num > cap:
            raise APIError(429, f"model {model.name!r} has {self._counts[model.name]} requests running or queued, "
                                f"its limit; retry later", code="queue_full", retry_after=RETRY_QUEUE_FULL_S)
        self._counts[model.name] += num

    def release(self, name: str, num: int) -> None:
        self._counts[name] -= num


class Generation:
    """One API request's engine requests (one per prompt), started at once and read as one stream.

    Their outputs meet in one `OutputSink`, which the consumer empties a batch at a time: whatever the engine
    produced since the last batch, each engine request's updates merged into one. Closing the generation (`aclose`)
    aborts the engine requests still running.
    """

    def __init__(self, client: EngineClient, prompts: list[Prompt], params: SamplingParams, priority: int,
                 metrics: Metrics, on_done: Callable[[], None], stats: StatsHub | None = None,
                 lora_name: str | None = None):
        self.n = params.n
        self.latest: list[RequestOutput | None] = [None] * len(prompts)
        self._client = client
        self._sink = OutputSink()
        self._on_done = on_done
        request_id = uuid.uuid4().hex
        self._running = {i: f"{request_id}-{i}" for i in range(len(prompts))}  # prompt index -> engine request id
        self._observers = [(metrics.request(client.name, lora_name),
                            stats.request(client.name) if stats is not None else None) for _ in prompts]
        try:
            for i, (text, token_ids) in enumerate(prompts):
                client.add_request(self._running[i], text, token_ids, params, self._sink, i, priority, lora_name)
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
        """Observes and keeps an update; returns the error it reports, if any."""
        observer, timer = self._observers[index]
        observer.observe(output)
        if timer is not None:  # the dashboard's TTFT and inter-token latency
            timer.observe(output)
        if output.finished:
            del self._running[index]
            self._on_done()
        if _failed(output):
            return APIError(500, "the engine failed while generating this request", code="engine_error")
        self.latest[index] = output
        return None

    def _close(self) -> None:
        """Aborts what still runs (nothing once all finished); safe to call more than once."""
        running, self._running = self._running, {}
        self._client.abort(list(running.values()))
        for _ in running:
            self._on_done()


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
                    usage_chunk: Callable[[Usage], msgspec.Struct] | None) -> Stream:
    """Server-sent events: a chunk per update of each choice (under load one update carries several tokens), the
    usage chunk if asked, then `[DONE]`. A failure mid-stream (an engine that died) ends it with an error event; the
    HTTP status is already sent."""

    def render_batch(batch: list[tuple[int, RequestOutput]], finished: set[int]) -> bytes:
        return b"".join(_event(render(choice, completion, output)) for index, output in batch
                        for choice, completion in _moved_choices(generation.n, index, output, finished))

    async def events() -> AsyncIterator[bytes]:
        finished: set[int] = set()
        try:
            try:
                async for batch in generation.outputs():
                    # A batch's chunks go out in one write: the HTTP layer's cost is per write, hardly per byte.
                    if chunks := render_batch(batch, finished):
                        yield chunks
                if usage_chunk is not None:
                    yield _event(usage_chunk(generation.usage()))
            except Exception as e:
                yield _event(error_body(to_api_error(e)))
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
