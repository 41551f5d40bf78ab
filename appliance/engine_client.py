"""The supervisor's handle on one engine replica: `EngineClientBase`, what every kind shares (requests in flight,
their outputs, LoRA changes, the engine's reports), and `ProcessEngineClient`, an engine process behind a socket.

Detokenizing, stop strings and n-sample gathering happen here (the engine's `OutputProcessor`), off the engine's
step loop. Each request's `RequestOutput` snapshots go to the `OutputSink` its caller gave; a caller that goes away
aborts its requests (`abort`). When the engine stops every in-flight request fails at once with `EngineDeadError`.
A kind supplies the transport: `_send` a message to the engine, `_recv` the engine's next one, `_reap` it once gone.
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

from appliance import ipc, log_pipe
from engine import contract
from appliance.engines import EngineDeadError, EnginePlan, EngineStartError, OutputSink
from engine.contract import LoraInfo
from engine.output_processor import OutputProcessor
from engine.contract import SchedulerStats
from engine.sampling_params import InvalidParameterError, SamplingParams

logger = logging.getLogger("kvbox.supervisor")


class EngineClientBase:
    def __init__(self, plan: EnginePlan):
        self.plan = plan
        self.info: contract.EngineReady | None = None
        self.stats: SchedulerStats | None = None
        self.loras: list[LoraInfo] = []  # the adapters this engine serves, as of its latest report
        self.dead = asyncio.Event()  # set once the engine is gone and reaped
        self.closed = False  # set as soon as the engine's channel closes
        self._inflight: dict[str, tuple[OutputSink, int]] = {}  # request id -> where its outputs go
        self._output_processor: OutputProcessor | None = None
        self._reader: asyncio.Task | None = None
        # LoRA changes are answered in the order they were sent: one future per change awaiting its LoraResult.
        self._lora_waiters: deque[asyncio.Future] = deque()
        # Sleep level 1: the engine's memory as last reported, and one future per Sleep or Wake sent.
        self.sleep_state: contract.EngineSleepState | None = None
        self._sleep_waiters: deque[asyncio.Future] = deque()
        self.failure: str | None = None  # why the running engine ended, as it said before it went (EngineFailed)

    @property
    def name(self) -> str:
        return self.plan.name

    @property
    def replica(self) -> int:
        return self.plan.replica

    @property
    def live(self) -> bool:
        """Ready and not stopped: the one test of whether this replica can take requests and LoRA changes."""
        return self.info is not None and not self.closed

    @property
    def num_inflight(self) -> int:
        return len(self._inflight)

    def _send(self, message: contract.ToEngine) -> None:
        raise NotImplementedError

    async def _recv(self) -> contract.FromEngine | None:
        """The engine's next message; None once it has gone."""
        raise NotImplementedError

    async def _reap(self) -> None:
        raise NotImplementedError

    async def _ready(self, info: contract.EngineReady, tokenizer) -> contract.EngineReady:
        """Starts reading the engine's messages; returns once its first memory report (which follows
        EngineReady) is in, so that a started model's figures are never blank."""
        self.info = info
        self._output_processor = OutputProcessor(tokenizer)
        first_report = asyncio.get_running_loop().create_future()
        self._sleep_waiters.append(first_report)
        self._reader = asyncio.create_task(self._read_loop(), name=f"engine-reader-{self.name}-{self.replica}")
        try:
            await first_report
        except EngineDeadError as e:
            raise EngineStartError(f"{self.name}: {e}") from None
        return info

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                    sink: OutputSink, index: int, priority: int = 0, lora_name: str | None = None,
                    pooling: contract.PoolingParams | None = None, cache_salt: str | None = None,
                    kv_parent: str | None = None, keep_kv: bool = False) -> None:
        """Starts a request; its snapshots go to `sink` under `index` as it grows, the last one finished. A
        rejection or the engine's death goes there too (`OutputSink.fail`). `kv_parent`, `keep_kv`: beam search's
        K/V forks (`contract.AddRequest`)."""
        if not self.live:
            raise EngineDeadError(f"model {self.name!r} is not running")
        if request_id in self._inflight:
            raise InvalidParameterError("request_id", f"duplicate request id {request_id!r}")
        self._inflight[request_id] = (sink, index)
        self._output_processor.add_request(request_id, prompt, prompt_token_ids, params)
        self._send(contract.AddRequest(request_id, prompt_token_ids, params, priority, cache_salt=cache_salt,
                                       lora_name=lora_name, pooling=pooling, kv_parent=kv_parent, keep_kv=keep_kv))

    def release_kv(self, request_ids: list[str]) -> None:
        """Frees the K/V that requests added with keep_kv kept for forks."""
        if request_ids and not self.closed:
            self._send(contract.ReleaseKV(request_ids))

    def abort(self, request_ids: list[str]) -> None:
        """Stops those of the requests still running; their sinks hear nothing more."""
        running = [r for r in request_ids if self._inflight.pop(r, None) is not None]
        for request_id in running:
            self._output_processor.abort(request_id)
        if running and not self.closed:
            self._send(contract.AbortRequests(running))

    async def load_lora(self, name: str, path: str) -> contract.LoraResult:
        """Loads or replaces adapter `name`; the result says whether the engine accepted it (and why not)."""
        return await self._change_lora(contract.LoadLora(name, path))

    async def unload_lora(self, name: str) -> contract.LoraResult:
        return await self._change_lora(contract.UnloadLora(name))

    async def _change_lora(self, message: contract.LoadLora | contract.UnloadLora) -> contract.LoraResult:
        if not self.live:
            raise EngineDeadError(f"model {self.name!r} is not running")
        waiter = asyncio.get_running_loop().create_future()
        self._lora_waiters.append(waiter)
        self._send(message)
        return await waiter

    async def sleep(self) -> contract.EngineSleepState:
        """Sleep level 1 (`engine.sleep`). Requests in flight fail at once (retrying wakes the model)."""
        running = list(self._inflight)
        self._fail_requests(EngineDeadError(f"model {self.name!r} was put to sleep"))
        if running:
            self._send(contract.AbortRequests(running))
        return await self._sleep_or_wake(contract.Sleep(1))

    async def wake(self) -> contract.EngineSleepState:
        return await self._sleep_or_wake(contract.Wake())

    async def _sleep_or_wake(self, message: contract.Sleep | contract.Wake) -> contract.EngineSleepState:
        if not self.live:
            raise EngineDeadError(f"model {self.name!r} is not running")
        waiter = asyncio.get_running_loop().create_future()
        self._sleep_waiters.append(waiter)
        self._send(message)
        return await waiter

    async def _read_loop(self) -> None:
        try:
            while (message := await self._recv()) is not None:
                self._dispatch(message)
        except Exception:
            logger.exception("%s[%d]: reading from the engine failed", self.name, self.replica)
        finally:
            self.closed = True  # from now on new requests fail at once instead of waiting on a dead engine
            self._fail_all(EngineDeadError(f"the engine of model {self.name!r} stopped"))
            await self._reap()
            self.dead.set()

    def _dispatch(self, message: contract.FromEngine) -> None:
        if isinstance(message, contract.StepOutputs):
            self._on_step(message)
        elif isinstance(message, contract.EngineSleepState):
            if not message.error:
                self.sleep_state = message
            if self._sleep_waiters:
                waiter = self._sleep_waiters.popleft()
                if not waiter.done():
                    waiter.set_result(message)
        elif isinstance(message, contract.LoraResult):
            self.loras = message.loras
            if self._lora_waiters:
                waiter = self._lora_waiters.popleft()
                if not waiter.done():
                    waiter.set_result(message)
        elif isinstance(message, contract.EngineFailed):
            self.failure = message.message
        elif isinstance(message, contract.RequestRejected):
            logger.info("request %s: %s[%d] refused it: %s: %s", message.request_id, self.name, self.replica,
                        message.param, message.message)
            target = self._inflight.pop(message.request_id, None)
            self._output_processor.abort(message.request_id)
            if target is not None:
                sink, index = target
                sink.fail(index, InvalidParameterError(message.param, message.message))

    def _on_step(self, message: contract.StepOutputs) -> None:
        if message.stats is not None:
            if message.stats.block_states is None and self.stats is not None:
                # The block map comes less often than the counts; keep showing the last one.
                message.stats.block_states = self.stats.block_states
            self.stats = message.stats
        if message.loras is not None:
            self.loras = message.loras
        if self.plan.on_step is not None:
            self.plan.on_step(message)
        request_outputs, to_stop = self._output_processor.process(message.outputs)
        if to_stop:
            self._send(contract.FinishSamples(to_stop))
        for output in request_outputs:
            target = (self._inflight.pop(output.request_id, None) if output.finished
                      else self._inflight.get(output.request_id))
            if target is not None:
                sink, index = target
                sink.put(index, output)

    def _fail_all(self, error: Exception) -> None:
        self._fail_requests(error)
        for waiter in (*self._lora_waiters, *self._sleep_waiters):
            if not waiter.done():
                waiter.set_exception(error)
        self._lora_waiters.clear()
        self._sleep_waiters.clear()

    def _fail_requests(self, error: Exception) -> None:
        inflight, self._inflight = self._inflight, {}
        if inflight:
            logger.error("%s[%d]: %s; failing requests %s", self.name, self.replica, error, ", ".join(inflight))
        for request_id, (sink, index) in inflight.items():
            self._output_processor.abort(request_id)
            sink.fail(index, error)


class ProcessEngineClient(EngineClientBase):
    """An engine in its own process (`python -m appliance.engine_process`), reached over a socket pair.

    A running engine sends something at least every few hundred milliseconds (outputs, or its idle stats): silence
    for `plan.hang_timeout_s` means its loop is stuck, and it is killed so that the supervisor restarts it.
    """

    def __init__(self, plan: EnginePlan):
        super().__init__(plan)
        self.process: asyncio.subprocess.Process | None = None
        self._channel: ipc.AsyncChannel | None = None
        self._last_heard = time.monotonic()
        self._watchdog: asyncio.Task | None = None
        self._log_forwarder: asyncio.Task | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def exit_code(self) -> int | None:
        return self.process.returncode if self.process else None

    async def launch(self) -> None:
        """Starts the process and sends it its config: it imports and builds while the caller goes on."""
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        log_read, log_write = log_pipe.open_pipe()  # its log lines, for the dashboard's log view
        try:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "appliance.engine_process", str(child_sock.fileno()),
                pass_fds=(child_sock.fileno(), log_write), start_new_session=False,
                env={**os.environ, **self.plan.env, log_pipe.ENV_FD: str(log_write)})
        except BaseException:
            os.close(log_read)
            raise
        finally:
            os.close(log_write)
        self._log_forwarder = asyncio.create_task(log_pipe.forward_engine_logs(
            log_read, f"{self.name}[{self.replica}]"), name=f"engine-logs-{self.name}-{self.replica}")
        child_sock.close()
        self._channel = await ipc.AsyncChannel.open(parent_sock)
        self._channel.send(contract.StartEngine(self.plan.engine_config))

    async def start(self, tokenizer, timeout_s: float = 600.0) -> contract.EngineReady:
        """Waits until the launched engine is ready (launching it first if `launch` was not called)."""
        if self.process is None:
            await self.launch()
        try:
            payload = await asyncio.wait_for(self._channel.recv(), timeout_s)
        except TimeoutError:
            await self.kill()
            raise EngineStartError(f"{self.name}: engine not ready after {timeout_s:.0f} s") from None
        message = ipc.decode_from_engine(payload) if payload is not None else None
        if not isinstance(message, contract.EngineReady):
            await self.kill()
            if isinstance(message, contract.EngineFailed):
                raise EngineStartError(f"{self.name}: {message.message}", message.waiting_for_ranks)
            raise EngineStartError(f"{self.name}: the engine process exited")
        self._last_heard = time.monotonic()
        self._watchdog = asyncio.create_task(self._watch_for_hang(), name=f"engine-watchdog-{self.name}")
        return await self._ready(message, tokenizer)

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        if self.process is None:
            return
        if self._channel is not None and self.process.returncode is None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                self._channel.send(contract.Shutdown())
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
                with contextlib.suppress(ProcessLookupError):  # it may have exited on its own just now
                    self.process.kill()
                await self.process.wait()
        if self._channel is not None:
            self._channel.close()

    def _send(self, message: contract.ToEngine) -> None:
        self._channel.send(message)

    async def _recv(self) -> contract.FromEngine | None:
        payload = await self._channel.recv()
        if payload is None:
            return None
        self._last_heard = time.monotonic()
        return ipc.decode_from_engine(payload)

    async def _reap(self) -> None:
        # The socket closed: the process is exiting or gone; reap it (so its real exit code is known), then make
        # sure it is gone.
        await self.kill(grace_s=2.0)

    async def _watch_for_hang(self) -> None:
        while not self.dead.is_set():
            await asyncio.sleep(min(1.0, self.plan.hang_timeout_s / 4))
            silent_s = time.monotonic() - self._last_heard
            if silent_s > self.plan.hang_timeout_s and self.process is not None and self.process.returncode is None:
                logger.error("%s[%d]: engine silent for %.0f s; killing it", self.name, self.replica, silent_s)
                self.process.kill()  # the reader sees the socket close and fails the in-flight requests
                return
