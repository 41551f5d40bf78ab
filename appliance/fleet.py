"""Many models on one machine: sleeping models, waking them on demand, and the least-recently-used rule.

A model sleeps when its engines are stopped (level 2, as vLLM names it: the weights are dropped and read again from
disk on wake); its tokenizer, adapter list and statistics stay in the supervisor, so a woken model serves what it
served before. A request to a sleeping model wakes it and waits (`server.wake_timeout_s`, then 503 with
Retry-After); concurrent requests share one wake. With `server.max_active_models`, waking a model first puts the least
recently used idle model to sleep; `idle_sleep_s` puts a model to sleep after that long without a request.
"""

from __future__ import annotations

import asyncio
import logging
import time

from appliance.supervisor import ModelRuntime, ModelStatus, ModelUnavailableError, Supervisor

logger = logging.getLogger("kvbox.supervisor")
IDLE_CHECK_S = 1.0
_ACTIVE = (ModelStatus.LOADING, ModelStatus.READY, ModelStatus.RESTARTING)


class SleepError(ValueError):
    """A sleep or wake that cannot be done (the level, or the model's state); the admin route's 400 or 409."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class Fleet:
    def __init__(self, supervisor: Supervisor):
        self.supervisor = supervisor
        self._idle_task: asyncio.Task | None = None
        self._idle_since: dict[str, float] = {}  # model -> when its last request ended (as the idle check saw it)

    def start(self) -> None:
        if any(spec.idle_sleep_s is not None for spec in self.supervisor.config.models):
            self._idle_task = asyncio.create_task(self._sleep_idle_models(), name="idle-sleep")

    async def stop(self) -> None:
        if self._idle_task is not None:
            self._idle_task.cancel()
            await asyncio.gather(self._idle_task, return_exceptions=True)

    async def ensure_awake(self, model: ModelRuntime) -> None:
        """Returns once the model can take requests; a sleeping one is woken (one wake shared by every caller)."""
        model.last_used = time.monotonic()
        if model.status is not ModelStatus.SLEEPING and model.waking is None:
            return
        if model.waking is None:
            model.waking = asyncio.create_task(self._wake(model), name=f"wake-{model.name}")
        timeout = self.supervisor.config.server.wake_timeout_s
        try:
            await asyncio.wait_for(asyncio.shield(model.waking), timeout)
        except TimeoutError:
            raise ModelUnavailableError(model.name, ModelStatus.LOADING) from None

    async def sleep(self, model: ModelRuntime, level: int = 2) -> None:
        if level != 2:
            raise SleepError("only sleep level 2 (engines stopped, weights read again on wake) is implemented; "
                             "level 1 (weights kept in host memory) is not yet")
        if model.status is ModelStatus.SLEEPING:
            return
        if model.status not in (ModelStatus.READY, ModelStatus.FAILED):
            raise SleepError(f"model {model.name!r} is {model.status.value}; it can sleep once ready", status=409)
        logger.info("%s: going to sleep (level %d)", model.name, level)
        await self.supervisor.stop_engines(model, ModelStatus.SLEEPING)

    async def _wake(self, model: ModelRuntime) -> None:
        try:
            await self._make_room(model)
            logger.info("%s: waking", model.name)
            started = time.perf_counter()
            await self.supervisor.start_engines(model)
            model.last_wake = time.time()
            logger.info("%s: awake (%s) in %.1f s", model.name, model.status.value, time.perf_counter() - started)
        finally:
            model.waking = None

    async def _make_room(self, waking: ModelRuntime) -> None:
        """Puts least recently used idle models to sleep until `waking` fits under max_active_models; waits while
        every active model is busy."""
        limit = self.supervisor.config.server.max_active_models
        while limit is not None:
            active = [m for m in self.supervisor.models.values() if m is not waking and m.status in _ACTIVE]
            if len(active) < limit:
                return
            idle = [m for m in active if m.status is ModelStatus.READY and m.num_inflight == 0 and m.waking is None]
            if idle:
                await self.sleep(min(idle, key=lambda m: m.last_used))
            else:
                await asyncio.sleep(0.05)

    async def _sleep_idle_models(self) -> None:
        """Idle time counts from the end of the model's last request (seen to the check's resolution)."""
        while True:
            await asyncio.sleep(IDLE_CHECK_S)
            now = time.monotonic()
            for model in list(self.supervisor.models.values()):
                if model.status is not ModelStatus.READY or model.num_inflight or model.spec.idle_sleep_s is None:
                    self._idle_since.pop(model.name, None)
                    continue
                idle_since = max(self._idle_since.setdefault(model.name, now), model.last_used)
                if now - idle_since >= model.spec.idle_sleep_s:
                    self._idle_since.pop(model.name, None)
                    await self.sleep(model)
