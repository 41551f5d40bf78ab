"""The supervisor: one engine process per model replica — start, wait for ready, watch, restart, drain, reload.

It runs in the HTTP server's process and event loop. Routes ask it for a model by name (`get`) and send requests to
the least-loaded ready replica. When an engine dies its in-flight requests fail at once (the engine client does
that), the model shows as restarting and comes back after a backoff; a model that keeps crashing is marked failed
and stays so until the config is reloaded. A replica whose ranks on other machines have not come (their node is not
up) is started again until they do, not counted a crash. Other models are never touched.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import functools
import logging
import os
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import psutil

from engine import contract
from appliance.config import MODEL_NAME_PATTERN, AppConfig, ModelSpec
from appliance.config.schema import SamplingDefaults
from appliance.engine_client import ProcessEngineClient
from appliance.engines import EngineClient, EngineDeadError, EngineFactory, EnginePlan, EngineStartError
from appliance.node import replica_env
from appliance.routing import PrefixRouter
from appliance.sampling_defaults import model_sampling_defaults
from appliance.sources import resolve_source
from engine.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from appliance.node import NodeLayout

logger = logging.getLogger("kvbox.supervisor")

RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)
MAX_CRASHES = 5  # within CRASH_WINDOW_S, then the model is marked failed
CRASH_WINDOW_S = 300.0
# A replica whose ranks on other machines did not come starts again this soon: its engine waited for them a minute.
RANKS_RETRY_S = 1.0


class _Start(enum.Enum):
    READY = "ready"
    FAILED = "failed"
    WAITING = "waiting"  # for ranks on other machines (`EngineStartError.waiting_for_ranks`): started again


class ModelStatus(str, enum.Enum):
    LOADING = "loading"
    READY = "ready"
    RESTARTING = "restarting"
    FAILED = "failed"
    DRAINING = "draining"
    STOPPED = "stopped"
    SLEEPING = "sleeping"  # level 1: engines hold weights in host memory; level 2: no engine runs. A request wakes it


class ModelNotFoundError(LookupError):
    pass


class LoraError(ValueError):
    """A LoRA change refused (the HTTP layer answers `status`); the adapters served are as they were."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


class ModelUnavailableError(RuntimeError):
    """The model exists but cannot take requests now (loading, restarting, failed, draining)."""

    def __init__(self, name: str, status: ModelStatus):
        super().__init__(f"model {name!r} is {status.value}")
        self.status = status


@dataclass
class ModelRuntime:
    spec: ModelSpec
    status: ModelStatus = ModelStatus.LOADING
    model_path: str | None = None
    tokenizer: object = None
    tokenizer_s: float = 0.0  # what loading it took, beside the engines' start
    launched_at: float = 0.0  # unix time its engines were last launched
    sampling_defaults: SamplingDefaults = field(default_factory=SamplingDefaults)  # YAML over the checkpoint's
    replicas: list[EngineClient] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)
    restarts: int = 0
    crash_times: deque = field(default_factory=lambda: deque(maxlen=MAX_CRASHES))
    errors: deque = field(default_factory=lambda: deque(maxlen=20))  # (unix time, message)
    tasks: list[asyncio.Task] = field(default_factory=list)
    # The LoRA adapters served, name -> resolved path: applied to every replica, and again to one that restarts.
    adapters: dict[str, str] = field(default_factory=dict)
    lora_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    router: PrefixRouter | None = None  # data-parallel replicas only
    last_used: float = field(default_factory=time.monotonic)  # the latest request's admission (LRU and idle sleep)
    last_wake: float | None = None  # unix time its engines last started after a sleep
    last_wake_s: float | None = None  # what that wake took (room made, weights copied back or loaded, graphs)
    waking: asyncio.Task | None = None  # the one wake that concurrent requests share
    sleep_level: int | None = None  # while SLEEPING: 1 (engines alive, weights in host memory) or 2 (no engines)

    def __post_init__(self) -> None:
        if self.spec.parallelism.data > 1 and self.spec.parallelism.routing == "prefix":
            # A replica a quarter of a batch busier than the least loaded one still gets a prompt it has cached.
            self.router = PrefixRouter(self.spec.kv_cache.block_size,
                                       max_busier=max(1, self.spec.scheduler.max_num_seqs // 4))

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def num_inflight(self) -> int:
        return sum(r.num_inflight for r in self.replicas)

    @property
    def info(self):
        return next((r.info for r in self.replicas if r.info is not None), None)

    def pick_replica(self, token_ids: list[int] | None = None) -> EngineClient:
        """The least-loaded live replica, or (given the prompt, with data parallelism) the one whose prefix cache
        likely holds most of it (`appliance.routing`)."""
        if self.status is not ModelStatus.READY:
            raise ModelUnavailableError(self.name, self.status)
        live = [r for r in self.replicas if r.live]
        if not live:
            raise ModelUnavailableError(self.name, ModelStatus.RESTARTING)
        if token_ids is not None and self.router is not None:
            return self.router.choose(live, token_ids)
        return min(live, key=lambda r: r.num_inflight)

    def record_error(self, message: str) -> None:
        logger.error("%s: %s", self.name, message)
        self.errors.append((time.time(), message))


class Supervisor:
    """`engine_factory` makes each replica: an engine process by default, `InProcessEngineClient` for an engine on
    a thread of this process."""

    def __init__(self, config: AppConfig, engine_factory: EngineFactory = ProcessEngineClient,
                 nodes: NodeLayout | None = None):
        self.config = config
        self.engine_factory = engine_factory
        self.nodes = nodes  # several machines: each replica's engine rendezvouses with the other nodes' ranks
        self.models: dict[str, ModelRuntime] = {}
        self.draining = False
        # Called with (model name, replica, StepOutputs) for every step message of every replica (the dashboard's
        # statistics); set before `start`.
        self.on_step: Callable[[str, int, object], None] | None = None

    async def start(self) -> None:
        """Starts every model and waits until each is ready or has failed."""
        await asyncio.gather(*(self._add_model(spec) for spec in self.config.models))

    @property
    def is_ready(self) -> bool:
        # A sleeping model is ready in the sense that matters: a request to it is answered (once it wakes).
        return bool(self.models) and all(m.status in (ModelStatus.READY, ModelStatus.SLEEPING)
                                         for m in self.models.values())

    def get(self, name: str) -> ModelRuntime:
        model = self.models.get(name)
        if model is None:
            raise ModelNotFoundError(name)
        return model

    def resolve(self, name: str) -> tuple[ModelRuntime, str | None]:
        """The model a request's `model` names, and the LoRA adapter if the name is one of its adapters."""
        model = self.models.get(name)
        if model is not None:
            return model, None
        for model in self.models.values():
            if name in model.adapters:
                return model, name
        raise ModelNotFoundError(name)

    async def load_lora(self, model: ModelRuntime, name: str, path: str) -> list:
        """Loads (or replaces) adapter `name` on every live replica of `model`; returns the engine's adapter list. If
        any replica refuses, the others are rolled back and LoraError is raised: nothing changes."""
        lora = model.spec.lora
        if not lora.enabled:
            raise LoraError(f"LoRA is not enabled for model {model.name!r} (set lora.enabled in its config)", "model")
        if not re.fullmatch(MODEL_NAME_PATTERN, name):
            raise LoraError(f"invalid adapter name {name!r}: 1 to 128 of A-Z a-z 0-9 . _ : / -", "lora_name")
        if name in self.models or any(name in m.adapters for m in self.models.values() if m is not model):
            raise LoraError(f"the name {name!r} is already taken by another model or adapter", "lora_name")
        # Resolved once, here: the engine loads the path that was checked, whatever a symlink points to later.
        real = os.path.realpath(path)
        if not lora.is_allowed_path(real):
            raise LoraError(f"{path!r} is outside the directories this model allows adapters from "
                            f"(lora.allowed_dirs)", "lora_path")
        async with model.lora_lock:
            replicas = self._live_replicas(model)
            results = await asyncio.gather(*(r.load_lora(name, real) for r in replicas), return_exceptions=True)
            refused = [r for r in results if not (isinstance(r, contract.LoraResult) and r.ok)]
            if refused:
                previous = model.adapters.get(name)
                await asyncio.gather(*(
                    replica.load_lora(name, previous) if previous is not None else replica.unload_lora(name)
                    for replica, result in zip(replicas, results)
                    if isinstance(result, contract.LoraResult) and result.ok), return_exceptions=True)
                first = refused[0]
                if isinstance(first, contract.LoraResult):
                    raise LoraError(first.message, "lora_path")
                raise LoraError(f"a replica of model {model.name!r} stopped while loading the adapter ({first}); "
                                f"nothing changed, retry once it is back", status=503)
            model.adapters[name] = real
            return results[0].loras

    async def unload_lora(self, model: ModelRuntime, name: str) -> list:
        if name not in model.adapters:
            raise LoraError(f"model {model.name!r} has no LoRA adapter named {name!r}", "lora_name", status=404)
        async with model.lora_lock:
            replicas = self._live_replicas(model)
            results = await asyncio.gather(*(r.unload_lora(name) for r in replicas), return_exceptions=True)
            model.adapters.pop(name, None)
            return next((r.loras for r in results if isinstance(r, contract.LoraResult)), [])

    def _live_replicas(self, model: ModelRuntime) -> list[EngineClient]:
        replicas = [r for r in model.replicas if r.live]
        if not replicas:
            raise ModelUnavailableError(model.name, model.status)
        return replicas

    async def _load_configured_loras(self, model: ModelRuntime) -> None:
        for adapter in model.spec.lora.adapters:
            try:
                await self.load_lora(model, adapter.name, adapter.path)
            except (LoraError, ModelUnavailableError, EngineDeadError) as e:
                model.record_error(f"LoRA adapter {adapter.name!r} not loaded: {e}")

    async def _restore_loras(self, model: ModelRuntime, client: EngineClient) -> None:
        """A restarted replica gets the adapters its siblings serve. One it cannot load back (its files changed
        meanwhile) is unloaded from the others too: every replica serves the same adapters, so a request never
        depends on which replica it reaches."""
        async with model.lora_lock:
            lost = {}
            for name, path in list(model.adapters.items()):
                try:
                    result = await client.load_lora(name, path)
                except EngineDeadError:
                    return
                if not result.ok:
                    lost[name] = result.message
            others = [r for r in model.replicas if r is not client and r.live]
            for name, message in lost.items():
                await asyncio.gather(*(r.unload_lora(name) for r in others), return_exceptions=True)
                del model.adapters[name]
                model.record_error(f"LoRA adapter {name!r} unloaded from every replica: replica {client.replica} "
                                   f"could not load it back after a restart: {message}")

    async def drain(self, timeout_s: float) -> None:
        """Stops taking requests, lets in-flight ones finish (up to the timeout), then stops every engine."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        for model in self.models.values():
            model.status = ModelStatus.DRAINING
        while any(m.num_inflight for m in self.models.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.stop()

    async def stop(self) -> None:
        await asyncio.gather(*(self._stop_model(m) for m in list(self.models.values())))

    async def reload(self, config: AppConfig) -> dict[str, list[str]]:
        """Starts added models, stops removed ones, restarts changed ones; leaves the rest alone."""
        old = {spec.name: spec for spec in self.config.models}
        new = {spec.name: spec for spec in config.models}
        removed = [n for n in old if n not in new]
        added = [n for n in new if n not in old]
        changed = [n for n in new if n in old and new[n] != old[n]]
        self.config = config
        await asyncio.gather(*(self._stop_model(self.models[n]) for n in removed + changed if n in self.models))
        await asyncio.gather(*(self._add_model(new[n]) for n in added + changed))
        return {"added": added, "removed": removed, "restarted": changed,
                "unchanged": [n for n in new if n not in added and n not in changed]}

    # ---- internals ----
    async def _add_model(self, spec: ModelSpec) -> None:
        model = ModelRuntime(spec)
        self.models[spec.name] = model
        try:
            model.model_path = await asyncio.to_thread(resolve_source, spec.source)
        except Exception as e:
            model.record_error(f"cannot load {spec.source!r}: {e}")
            model.status = ModelStatus.FAILED
            return
        if spec.load == "on_demand":
            # The first request starts the engines (appliance.fleet); the tokenizer serves /tokenize meanwhile.
            if await self._load_tokenizer(model):
                model.status, model.sleep_level = ModelStatus.SLEEPING, 2
            return
        await self.start_engines(model)

    async def start_engines(self, model: ModelRuntime) -> None:
        """Starts the model's replicas (and loads its tokenizer the first time); READY or FAILED after."""
        spec = model.spec
        model.status = ModelStatus.LOADING
        # A step may take as long as the engine may stay silent, so its ranks wait that long for each other too.
        engine_config = dataclasses.replace(spec.to_engine_config(model.model_path),
                                            collective_timeout_s=self.config.server.engine_hang_timeout_s,
                                            rank_heartbeat_timeout_s=self.config.server.rank_heartbeat_timeout_s)
        on_step = self.on_step
        ranks_here = len(self.nodes.local_ranks(spec)) if self.nodes else None
        model.replicas = [self.engine_factory(EnginePlan(
            spec.name, self.nodes.engine_config(self.config, spec.name, i, engine_config) if self.nodes
            else engine_config, i, replica_env(spec, i, self.config, ranks_here),
            self.config.server.engine_hang_timeout_s,
            on_step=functools.partial(on_step, spec.name, i) if on_step else None))
            for i in range(spec.parallelism.data)]
        # The engines import and build (the longest part of a start) while this process loads the tokenizer.
        for replica in model.replicas:
            logger.info("%s[%d]: starting its engine", spec.name, replica.replica)
        model.launched_at = time.time()
        await asyncio.gather(*(replica.launch() for replica in model.replicas))
        if model.tokenizer is None and not await self._load_tokenizer(model):
            return
        results = await asyncio.gather(*(self._start_replica(model, r) for r in model.replicas))
        ready = all(result is _Start.READY for result in results)
        if ready:  # before READY, so that the adapters are there from the first request
            if model.adapters:  # woken from sleep: the adapters it served before
                await asyncio.gather(*(self._restore_loras(model, r) for r in model.replicas))
            else:
                await self._load_configured_loras(model)
        if model.status is ModelStatus.LOADING:
            model.status = (ModelStatus.READY if ready else ModelStatus.FAILED if _Start.FAILED in results
                            else ModelStatus.RESTARTING)
        # Replicas that started are restarted when they end; those waiting for other machines' ranks, until they come.
        model.tasks = [asyncio.create_task(self._watch(model, r, waiting=result is _Start.WAITING),
                                           name=f"watch-{spec.name}-{r.replica}")
                       for r, result in zip(model.replicas, results) if result is not _Start.FAILED]

    async def stop_engines(self, model: ModelRuntime, status: ModelStatus, cancel_watchers: bool = True) -> None:
        """Stops the model's replicas and leaves it in `status` (its tokenizer and adapter list stay)."""
        model.status = status
        for task in model.tasks if cancel_watchers else ():
            task.cancel()
        await asyncio.gather(*(r.shutdown() for r in model.replicas), return_exceptions=True)
        model.replicas, model.tasks = [], []

    async def _load_tokenizer(self, model: ModelRuntime) -> bool:
        spec = model.spec
        try:
            started = time.perf_counter()
            model.tokenizer = await asyncio.to_thread(load_tokenizer, spec.tokenizer or model.model_path)
            model.tokenizer_s = time.perf_counter() - started
            logger.info("%s: tokenizer loaded in %.1f s", spec.name, model.tokenizer_s)
            model.sampling_defaults = model_sampling_defaults(spec, model.model_path, self.config.server.max_tokens)
        except BaseException as e:  # a failure, or a shutdown cancelling the start: no engine may outlive it
            await asyncio.gather(*(replica.kill() for replica in model.replicas))
            if not isinstance(e, Exception):
                raise
            model.record_error(f"cannot load the tokenizer of {spec.tokenizer or spec.source!r}: {e}")
            model.status = ModelStatus.FAILED
            return False
        return True

    async def _start_replica(self, model: ModelRuntime, client: EngineClient) -> _Start:
        try:
            info = await client.start(model.tokenizer)
        except EngineStartError as e:
            model.record_error(str(e) + ("; starting again to wait for them" if e.waiting_for_ranks else ""))
            client.dead.set()  # its engine is gone: a watcher goes on from here
            return _Start.WAITING if e.waiting_for_ranks else _Start.FAILED
        logger.info("%s[%d]: ready on %s (%s, %d KV blocks, %s kernels)", model.name, client.replica, info.device,
                    info.dtype, info.num_kv_blocks, info.kernel_backend)
        logger.info("%s[%d]: start-up %s", model.name, client.replica, startup_phases(model, info.startup_seconds))
        return _Start.READY

    async def _watch(self, model: ModelRuntime, client: EngineClient, waiting: bool = False) -> None:
        """Restarts a replica whenever its process dies, with backoff, until it crashes too often; one `waiting` for
        ranks on other machines is started again, without counting it a crash, until they come (a node may be away
        for as long as it takes; the model answers 503 meanwhile)."""
        while True:
            await client.dead.wait()
            if model.status in (ModelStatus.DRAINING, ModelStatus.STOPPED):
                return
            if model.status is ModelStatus.SLEEPING:  # asleep at level 1: no engine is needed until a wake
                model.record_error(f"engine replica {client.replica} exited while asleep; the model sleeps at level 2")
                await self.stop_engines(model, ModelStatus.SLEEPING, cancel_watchers=False)
                model.sleep_level = 2
                return
            if waiting:
                delay = RANKS_RETRY_S
            else:
                why = f": {client.failure}" if client.failure else ""
                model.record_error(f"engine replica {client.replica} exited (code {client.exit_code}){why}")
                now = time.monotonic()
                model.crash_times.append(now)
                if len(model.crash_times) == MAX_CRASHES and now - model.crash_times[0] < CRASH_WINDOW_S:
                    model.status = ModelStatus.FAILED
                    model.record_error(f"crashed {MAX_CRASHES} times in {CRASH_WINDOW_S:.0f} s; marked failed")
                    return
                delay = RESTART_BACKOFF_S[min(len(model.crash_times) - 1, len(RESTART_BACKOFF_S) - 1)]
            model.status = ModelStatus.RESTARTING
            await asyncio.sleep(delay)
            logger.info("%s[%d]: starting its engine again", model.name, client.replica)
            replacement = self.engine_factory(client.plan)
            model.replicas[model.replicas.index(client)] = replacement
            client = replacement
            model.restarts += 1
            started = await self._start_replica(model, client)
            waiting = started is _Start.WAITING  # else a failed start counts as another crash on the next turn
            if started is _Start.READY:
                await self._restore_loras(model, client)
                if all(r.live for r in model.replicas):
                    model.status = ModelStatus.READY

    async def _stop_model(self, model: ModelRuntime) -> None:
        if model.waking is not None:
            model.waking.cancel()
        await self.stop_engines(model, ModelStatus.STOPPED)
        if self.models.get(model.name) is model:
            del self.models[model.name]


def startup_phases(model: ModelRuntime, engine_seconds: dict[str, float]) -> str:
    """Where a replica's start took its time, in one line of name=seconds: the engine's phases (its process's
    imports, weights, KV cache, CUDA graphs), the tokenizer (loaded here beside the engines' first start), and the
    whole from the launch and from this process's own start (its imports and config come before any launch)."""
    now = time.time()
    phases = {**engine_seconds, "tokenizer": model.tokenizer_s, "launch_to_ready": now - model.launched_at,
              "server_start_to_ready": now - psutil.Process().create_time()}
    return " ".join(f"{name}={seconds:.1f}s" for name, seconds in phases.items())
