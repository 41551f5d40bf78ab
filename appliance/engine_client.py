"""The supervisor's handle on one engine process: start it, send requests, stream their outputs back.

Detokenizing, stop strings and n-sample gathering happen here (the engine's `OutputProcessor`), off the engine's
step loop. Each request's `RequestOutput` snapshots go to the `OutputSink` its caller gave; a caller that goes away
aborts its requests (`abort`). When the process dies every in-flight request fails at once with `EngineDeadError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import time
from collections import deque
from collections.abc import Callable

from appliance import ipc
from engine.config import EngineConfig
from engine.lora.manager import LoraInfo
from engine.output_processor import OutputProcessor, RequestOutput
from engine.contract import SchedulerStats
from engine.sampling_params import InvalidParameterError, SamplingParams

logger = logging.getLogger("kvbox.supervisor")


class EngineDeadError(RuntimeError):
    """The engine process died or stopped answering while requests were in flight."""


class EngineStartError(RuntimeError):
    pass


class OutputSink:
    """Where the reader puts the outputs of one API request's engine requests (one per prompt) for its one consumer.

    While the consumer is busy, the updates of each engine request merge into one (`RequestOutput.add`): under load
    one wake-up, and one SSE chunk, carries several steps' tokens, so that the front end's work follows the number
    of requests rather than of tokens. Within an engine request nothing is dropped or reordered.
    """

    def __init__(self):
        self._outputs: dict[int, RequestOutput] = {}  # prompt index -> its updates not taken yet, merged
        self._errors: list[tuple[int, BaseException]] = []
        self._waiter: asyncio.Future | None = None

    def put(self, index: int, output: RequestOutput) -> None:
        """`output` is the processor's own object, which its next step changes: it is copied or merged now."""
        pending = self._outputs.get(index)
        if pending is None:
            self._outputs[index] = output.snapshot()
            self._wake()
        else:
            pending.add(output)

    def fail(self, index: int, error: BaseException) -> None:
        self._errors.append((index, error))
        self._wake()

    async def take(self) -> list[tuple[int, RequestOutput | BaseException]]:
        """Everything put since the last take, outputs before errors (an error is a request's last news); waits
        while there is nothing."""
        while not self._outputs and not self._errors:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        taken: list = [*self._outputs.items(), *self._errors]
        self._outputs, self._errors = {}, []
        return taken

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class SpawnedEngine:
    """An engine process that has its config and is building its engine, not yet owned by an EngineClient."""

    def __init__(self, process: asyncio.subprocess.Process, channel: ipc.AsyncChannel):
        self.process = process
        self.channel = channel

    async def kill(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # it may have exited on its own just now
                self.process.kill()
            await self.process.wait()
        self.channel.close()


async def spawn_engine(engine_config: EngineConfig, env: dict[str, str]) -> SpawnedEngine:
    """Starts `python -m appliance.engine_process` and sends it its config: it imports and builds while the caller
    goes on (the supervisor loads the tokenizer meanwhile)."""
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "appliance.engine_process", str(child_sock.fileno()),
        pass_fds=(child_sock.fileno(),), env={**os.environ, **env}, start_new_session=False)
    child_sock.close()
    channel = await ipc.AsyncChannel.open(parent_sock)
    channel.send(ipc.StartEngine(engine_config))
    return SpawnedEngine(process, channel)


class EngineClient:
    def __init__(self, name: str, engine_config: EngineConfig, tokenizer, replica: int = 0,
                 env: dict[str, str] | None = None, on_step: Callable[[ipc.StepOutputs], None] | None = None,
                 hang_timeout_s: float = 120.0):
        self.name = name
        self.engine_config = engine_config
        self.tokenizer = tokenizer
        self.replica = replica
        self.env = env or {}
        self.on_step = on_step
        self.info: ipc.EngineReady | None = None
        self.stats: SchedulerStats | None = None
        self.process: asyncio.subprocess.Process | None = None
        self._channel: ipc.AsyncChannel | None = None
        self._reader: asyncio.Task | None = None
        self._inflight: dict[str, tuple[OutputSink, int]] = {}  # request id -> where its outputs go
        self._output_processor = OutputProcessor(tokenizer)
        self.dead = asyncio.Event()  # set once the process is gone and reaped
        self.closed = False  # set as soon as the engine's socket closes
        # A running engine sends something at least every few hundred milliseconds (outputs, or its idle stats):
        # silence this long means its loop is stuck, and it is killed so that the supervisor restarts it.
        self.hang_timeout_s = hang_timeout_s
        self._last_heard = time.monotonic()
        self._watchdog: asyncio.Task | None = None
        # LoRA changes are answered in the order they were sent: one future per change awaiting its LoraResult.
        self._lora_waiters: deque[asyncio.Future] = deque()
        self.loras: list[LoraInfo] = []  # the adapters this engine serves, as of its latest LoraResult

    @property
    def num_inflight(self) -> int:
        return len(self._inflight)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    async def start(self, timeout_s: float = 600.0, spawned: SpawnedEngine | None = None) -> ipc.EngineReady:
        """Starts the engine process, or takes over one that `spawn_engine` started for this client, and waits
        until it is ready."""
        spawned = spawned or await spawn_engine(self.engine_config, self.env)
        self.process, self._channel = spawned.process, spawned.channel
        try:
            payload = await asyncio.wait_for(self._channel.recv(), timeout_s)
        except TimeoutError:
            await self.kill()
            raise EngineStartError(f"{self.name}: engine not ready after {timeout_s:.0f} s") from None
        message = ipc.decode_from_engine(payload) if payload is not None else None
        if not isinstance(message, ipc.EngineReady):
            await self.kill()
            reason = message.message if isinstance(message, ipc.EngineFailed) else "the engine process exited"
            raise EngineStartError(f"{self.name}: {reason}")
        self.info = message
        self._last_heard = time.monotonic()
        self._reader = asyncio.create_task(self._read_loop(), name=f"engine-reader-{self.name}-{self.replica}")
        self._watchdog = asyncio.create_task(self._watch_for_hang(), name=f"engine-watchdog-{self.name}")
        return message

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                    sink: OutputSink, index: int, priority: int = 0, lora_name: str | None = None) -> None:
        """Starts a request; its snapshots go to `sink` under `index` as it grows, the last one finished. A
        rejection or the engine's death goes there too (`OutputSink.fail`)."""
        if self.closed or self._channel is None:
            raise EngineDeadError(f"model {self.name!r} is not running")
        if request_id in self._inflight:
            raise InvalidParameterError("request_id", f"duplicate request id {request_id!r}")
        self._inflight[request_id] = (sink, index)
        self._output_processor.add_request(request_id, prompt, prompt_token_ids, params)
        self._channel.send(ipc.AddRequest(request_id, prompt_token_ids, params, priority, lora_name=lora_name))

    def abort(self, request_ids: list[str]) -> None:
        """Stops those of the requests still running; their sinks hear nothing more."""
        running = [r for r in request_ids if self._inflight.pop(r, None) is not None]
        for request_id in running:
            self._output_processor.abort(request_id)
        if running and not self.closed and self._channel is not None:
            self._channel.send(ipc.AbortRequests(running))

    async def load_lora(self, name: str, path: str) -> ipc.LoraResult:
        """Loads or replaces adapter `name`; the result says whether the engine accepted it (and why not)."""
        return await self._change_lora(ipc.LoadLora(name, path))

    async def unload_lora(self, name: str) -> ipc.LoraResult:
        return await self._change_lora(ipc.UnloadLora(name))

    async def _change_lora(self, message: ipc.LoadLora | ipc.UnloadLora) -> ipc.LoraResult:
        if self.closed or self._channel is None:
            raise EngineDeadError(f"model {self.name!r} is not running")
        waiter = asyncio.get_running_loop().create_future()
        self._lora_waiters.append(waiter)
        self._channel.send(message)
        return await waiter

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        if self.process is None:
            return
        if self._channel is not None and self.process.returncode is None:
            try:
                self._channel.send(ipc.Shutdown())
            except (ConnectionError, RuntimeError):
                pass
        try:
            await asyncio.wait_for(self.process.wait(), timeout_s)
        except TimeoutError:
            await self.kill()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)

    async def kill(self, grace_s: float = 0.0) -> None:
        """Ends the process (after `grace_s` for it to exit on its own) and closes the socket."""
        if self.process is not None and self.process.returncode is None:
            try:
                await asyncio.wait_for(self.process.wait(), grace_s)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self._channel is not None:
            self._channel.close()

    async def _read_loop(self) -> None:
        try:
            while (payload := await self._channel.recv()) is not None:
                self._last_heard = time.monotonic()
                self._dispatch(ipc.decode_from_engine(payload))
        except Exception:
            logger.exception("%s: reading from the engine failed", self.name)
        finally:
            self.closed = True  # from now on new requests fail at once instead of waiting on a dead socket
            self._fail_all(EngineDeadError(f"the engine of model {self.name!r} stopped"))
            # The socket closed: the process is exiting or gone; reap it (so its real exit code is known), then
            # make sure it is gone.
            await self.kill(grace_s=2.0)
            self.dead.set()

    async def _watch_for_hang(self) -> None:
        while not self.dead.is_set():
            await asyncio.sleep(min(1.0, self.hang_timeout_s / 4))
            silent_s = time.monotonic() - self._last_heard
            if silent_s > self.hang_timeout_s and self.process is not None and self.process.returncode is None:
                logger.error("%s[%d]: engine silent for %.0f s; killing it", self.name, self.replica, silent_s)
                self.process.kill()  # the reader sees the socket close and fails the in-flight requests
                return

    def _dispatch(self, message: ipc.FromEngine) -> None:
        if isinstance(message, ipc.StepOutputs):
            if message.stats is not None:
                if message.stats.block_states is None and self.stats is not None:
                    # The block map comes less often than the counts; keep showing the last one.
                    message.stats.block_states = self.stats.block_states
                self.stats = message.stats
            if message.loras is not None:
                self.loras = message.loras
            if self.on_step is not None:
                self.on_step(message)
            request_outputs, to_stop = self._output_processor.process(message.outputs)
            if to_stop:
                self._channel.send(ipc.FinishSamples(to_stop))
            for output in request_outputs:
                target = (self._inflight.pop(output.request_id, None) if output.finished
                          else self._inflight.get(output.request_id))
                if target is not None:
                    sink, index = target
                    sink.put(index, output)
        elif isinstance(message, ipc.LoraResult):
            self.loras = message.loras
            if self._lora_waiters:
                waiter = self._lora_waiters.popleft()
                if not waiter.done():
                    waiter.set_result(message)
        elif isinstance(message, ipc.RequestRejected):
            target = self._inflight.pop(message.request_id, None)
            self._output_processor.abort(message.request_id)
            if target is not None:
                sink, index = target
                sink.fail(index, InvalidParameterError(message.param, message.message))

    def _fail_all(self, error: Exception) -> None:
        inflight, self._inflight = self._inflight, {}
        for request_id, (sink, index) in inflight.items():
            self._output_processor.abort(request_id)
            sink.fail(index, error)
        while self._lora_waiters:
            waiter = self._lora_waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)
