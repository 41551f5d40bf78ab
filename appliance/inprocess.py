"""`InProcessEngineClient`: an engine replica whose `EngineCore` runs on a thread of this process.

The HTTP app and the supervisor treat it like an engine process (`Supervisor(config, engine_factory=
InProcessEngineClient)`): the same messages reach the same step loop (`appliance.engine_process.EngineLoop`, which
validates nothing and runs `EngineCore` steps), and the outputs come back through the same `OutputProcessor` and
`OutputSink` path; only the socket and the serialization are left out. The step loop runs on its own thread so that
the event loop stays free while the engine computes; messages cross to it through the loop's inbox queue and come
back through `call_soon_threadsafe`. Tests get an appliance in milliseconds instead of an engine process's seconds.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from engine import contract
from appliance.engine_client import EngineClientBase
from appliance.engine_process import EngineLoop, ready_message
from appliance.engines import EnginePlan, EngineStartError, waits_for_ranks
from engine.core import EngineCore

logger = logging.getLogger("kvbox.engine")


class _Outbox:
    """The step loop's `channel`: what it sends goes to the client's queue on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
        self._loop, self._queue = loop, queue

    def send(self, message: contract.FromEngine | None) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, message)
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            pass


class InProcessEngineClient(EngineClientBase):
    def __init__(self, plan: EnginePlan):
        super().__init__(plan)
        self.exit_code: int | None = None
        self._building: asyncio.Future[EngineCore] | None = None
        self._messages: asyncio.Queue = asyncio.Queue()
        self._engine_loop: EngineLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return None  # no process of its own

    async def launch(self) -> None:
        self._building = asyncio.ensure_future(asyncio.to_thread(EngineCore, self.plan.engine_config))

    async def start(self, tokenizer, timeout_s: float = 600.0) -> contract.EngineReady:
        if self._building is None:
            await self.launch()
        try:
            core = await asyncio.wait_for(self._building, timeout_s)
        except Exception as e:
            raise EngineStartError(f"{self.name}: {type(e).__name__}: {e}",
                                   waits_for_ranks(e, self.plan.engine_config)) from e
        self._engine_loop = EngineLoop(_Outbox(asyncio.get_running_loop(), self._messages), core)
        self._thread = threading.Thread(target=self._run, name=f"engine-{self.name}-{self.replica}", daemon=True)
        self._thread.start()
        return await self._ready(ready_message(core), tokenizer)

    def _run(self) -> None:
        try:
            self._engine_loop.run()
            code = 0
        except Exception as e:
            logger.exception("%s[%d]: the engine's step loop failed", self.name, self.replica)
            self._engine_loop.channel.send(contract.EngineFailed(f"{type(e).__name__}: {e}"))
            code = 1
        finally:
            self._engine_loop.core.shutdown()  # a parallel engine's workers and process group, as its process does
        if self.exit_code is None:
            self.exit_code = code
        self._engine_loop.channel.send(None)  # the client's reader sees the engine gone

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        if self._engine_loop is None:
            return
        self._send(contract.Shutdown())
        await asyncio.to_thread(self._thread.join, timeout_s)
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)

    async def kill(self) -> None:
        """Stops the step loop at its next turn, as if the engine had crashed (the supervisor restarts it)."""
        if self._engine_loop is not None and self.exit_code is None:
            self.exit_code = -9
            self._send(contract.Shutdown())

    def _send(self, message: contract.ToEngine) -> None:
        self._engine_loop.inbox.put(message)

    async def _recv(self) -> contract.FromEngine | None:
        return await self._messages.get()

    async def _reap(self) -> None:
        await asyncio.to_thread(self._thread.join)
