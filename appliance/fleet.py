"""Many models on one machine: sleeping models, waking them on demand, and the least-recently-used rule.

Two sleep levels, as vLLM names them. Level 1: each engine frees its KV cache and moves its weights to pinned host
memory (`engine.sleep`); the processes stay, so a wake is two copies. Level 2: the engines are stopped, the weights
read again from disk on wake. Either way the tokenizer, adapter list and statistics stay in the supervisor, so a
woken model serves what it served before. A request to a sleeping model wakes it and waits (`server.wake_timeout_s`,
then 503 with Retry-After); concurrent requests share one wake. A wake that fails (an engine dies while waking, or
cannot start) answers its waiting requests with a 503 at once and the model is started again with backoff. With
`server.max_active_models`, waking a model first puts the least recently used idle model to sleep (a level-1
sleeper holds no device memory but its process's, so it does not count as active); `idle_sleep_s` puts a model to
sleep after that long without a request, at its `sleep_level`.
"""

from __future__ import annotations

import asyncio
import logging
import time

from appliance.engines import EngineDeadError
from appliance.supervisor import RESTART_BACKOFF_S, ModelRuntime, ModelStatus, ModelUnavailableError, Supervisor

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
        self._restarts: set[asyncio.Task] = set()  # models started again after a failed wake

    def start(self) -> None:
        if any(spec.idle_sleep_s is not None for spec in self.supervisor.config.models):
            self._idle_task = asyncio.create_task(self._sleep_idle_models(), name="idle-sleep")

    async def stop(self) -> None:
        tasks = [*self._restarts, *([self._idle_task] if self._idle_task is not None else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

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
        except EngineDeadError:
            raise ModelUnavailableError(model.name, ModelStatus.RESTARTING) from None

    async def sleep(self, model: ModelRuntime, level: int = 2) -> None:
        if model.status is ModelStatus.SLEEPING and (model.sleep_level == 2 or level == 1):
            return
        if model.waking is not None or model.status not in (ModelStatus.READY, ModelStatus.FAILED,
                                                            ModelStatus.SLEEPING):
            raise SleepError(f"model {model.name!r} is {model.status.value}; it can sleep once ready", status=409)
        logger.info("%s: going to sleep (level %d)", model.name, level)
        if level == 2 or model.status is not ModelStatus.READY:
            await self.supervisor.stop_engines(model, ModelStatus.SLEEPING)
            model.sleep_level = 2
            return
        model.status, model.sleep_level = ModelStatus.SLEEPING, 1
        results = await asyncio.gather(*(r.sleep() for r in model.replicas), return_exceptions=True)
        refused = next((r.error for r in results if not isinstance(r, BaseException) and r.error), None)
        if refused:  # every replica refuses alike (requests still running): the ones that slept are woken
            await asyncio.gather(*(r.wake() for r in model.replicas if r.live), return_exceptions=True)
            model.status, model.sleep_level = ModelStatus.READY, None
            raise SleepError(refused, status=409)

    async def restart(self, model: ModelRuntime) -> None:
        """Stops the model's engines (failing their requests) and starts fresh ones, awake; an operator's reset."""
        if model.waking is not None or model.status in (ModelStatus.LOADING, ModelStatus.DRAINING):
            raise SleepError(f"model {model.name!r} is {model.status.value}; restart it once it is ready", status=409)
        logger.info("%s: restarting on request", model.name)
        await self.supervisor.stop_engines(model, ModelStatus.LOADING)
        model.sleep_level = None
        await self.supervisor.start_engines(model)
        model.restarts += 1

    async def _wake(self, model: ModelRuntime) -> None:
        try:
            await self._make_room(model)
            logger.info("%s: waking from level %d", model.name, model.sleep_level)
            started = time.perf_counter()
            if model.sleep_level == 1:
                await self._wake_engines(model)
            else:
                await self.supervisor.start_engines(model)
                if model.status is not ModelStatus.READY:
                    self._restart_later(model)
                    raise EngineDeadError(f"model {model.name!r} did not start")
            model.last_wake, model.sleep_level = time.time(), None
            model.last_wake_s = time.perf_counter() - started
            logger.info("%s: awake in %.2f s", model.name, model.last_wake_s)
        finally:
            model.waking = None

    async def _wake_engines(self, model: ModelRuntime) -> None:
        """An engine that dies while waking is restarted by the supervisor's watcher (with backoff), awake."""
        model.status = ModelStatus.LOADING
        results = await asyncio.gather(*(r.wake() for r in model.replicas), return_exceptions=True)
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is not None:
            model.sleep_level = None  # what restarts is a fresh engine, awake
            model.status = ModelStatus.RESTARTING
            raise EngineDeadError(f"model {model.name!r}: an engine stopped while waking ({failed})")
        model.status = ModelStatus.READY

    def _restart_later(self, model: ModelRuntime) -> None:
        """A model whose engines did not start on wake is started again with backoff; its requests get 503s."""
        async def restart() -> None:
            for delay in RESTART_BACKOFF_S:
                model.status = ModelStatus.RESTARTING
                await asyncio.sleep(delay)
                if self.supervisor.models.get(model.name) is not model:  # removed or replaced by a reload
                    return
                await self.supervisor.stop_engines(model, ModelStatus.RESTARTING)
                await self.supervisor.start_engines(model)
                if model.status is ModelStatus.READY:
                    model.last_wake, model.sleep_level = time.time(), None
                    return
            model.status = ModelStatus.FAILED
            model.record_error(f"did not start in {len(RESTART_BACKOFF_S)} attempts after a wake; marked failed")
        model.status = ModelStatus.RESTARTING
        task = asyncio.create_task(restart(), name=f"restart-{model.name}")
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

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
                lru = min(idle, key=lambda m: m.last_used)
                await self.sleep(lru, lru.spec.sleep_level)
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
                    await self.sleep(model, model.spec.sleep_level)


def memory_of(model: ModelRuntime) -> dict[str, int]:
    """The model's memory over its engines as they last reported it: weights on the device (in host memory on a CPU
    engine), KV cache, and the weights' host copy while asleep at level 1 (all 0 at level 2: no engine runs)."""
    states = [r.sleep_state for r in model.replicas if r.sleep_state is not None]
    return {"weight_bytes": sum(s.weight_bytes for s in states), "kv_cache_bytes": sum(s.kv_cache_bytes for s in states),
            "host_copy_bytes": sum(s.host_copy_bytes for s in states)}
