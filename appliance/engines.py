"""What the supervisor and the HTTP routes need of one engine replica (`EngineClient`), however it runs.

Two kinds implement it: `appliance.engine_client.ProcessEngineClient` (an engine process behind a socket, what the
appliance serves with) and `appliance.inprocess.InProcessEngineClient` (an `EngineCore` on a thread of this process,
for tests and embedding). The supervisor makes them through an `EngineFactory` from an `EnginePlan`, and makes a
fresh one from the same plan when a replica dies. This module also owns what both kinds share with their callers:
`OutputSink`, where one API request's outputs meet, and the errors a replica raises.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from engine import contract
from engine.config import EngineConfig
from engine.contract import LoraInfo
from engine.output_processor import RequestOutput
from engine.contract import SchedulerStats
from engine.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine died or stopped answering while requests were in flight."""


class EngineStartError(RuntimeError):
    """A replica that did not start; `waiting_for_ranks`: see `contract.EngineFailed`."""

    def __init__(self, message: str, waiting_for_ranks: bool = False):
        super().__init__(message)
        self.waiting_for_ranks = waiting_for_ranks


def waits_for_ranks(error: BaseException, config: EngineConfig) -> bool:
    """Whether a failed engine start only found other machines' ranks missing (retried without limit)."""
    from engine.distributed.parallel_state import RendezvousTimeout  # it imports torch: the API server starts without

    return isinstance(error, RendezvousTimeout) and config.nnodes > 1


@dataclass(frozen=True)
class EnginePlan:
    """Everything needed to (re)build one replica of a model."""
    name: str  # the model's name
    engine_config: EngineConfig
    replica: int = 0
    env: dict[str, str] = field(default_factory=dict)  # a process's environment (its GPUs, its CPU threads)
    hang_timeout_s: float = 120.0
    # Called with every step message (the dashboard's statistics).
    on_step: Callable[[contract.StepOutputs], None] | None = None


class EngineClient(Protocol):
    """One engine replica. `launch` begins building the engine and returns at once; `start` waits until it is
    ready (the supervisor loads the tokenizer in between). Requests' outputs go to the `OutputSink` their caller
    gives; when the engine dies every in-flight request fails with `EngineDeadError`, `closed` turns true at once
    and `dead` is set once the engine is gone for good."""

    plan: EnginePlan
    info: contract.EngineReady | None
    stats: SchedulerStats | None
    loras: list[LoraInfo]
    sleep_state: contract.EngineSleepState | None  # its memory as of its latest report (sleep level 1)
    failure: str | None  # why it ended, where it said (a lost parallel rank, a device fault, a failed step)
    dead: asyncio.Event

    @property
    def name(self) -> str: ...
    @property
    def replica(self) -> int: ...
    @property
    def live(self) -> bool: ...
    @property
    def num_inflight(self) -> int: ...
    @property
    def pid(self) -> int | None: ...
    @property
    def exit_code(self) -> int | None: ...

    async def launch(self) -> None: ...
    async def start(self, tokenizer, timeout_s: float = 600.0) -> contract.EngineReady: ...
    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                    sink: OutputSink, index: int, priority: int = 0, lora_name: str | None = None,
                    pooling: contract.PoolingParams | None = None,
                    cache_salt: str | None = None, kv_parent: str | None = None, keep_kv: bool = False) -> None: ...
    def abort(self, request_ids: list[str]) -> None: ...
    def release_kv(self, request_ids: list[str]) -> None: ...
    async def load_lora(self, name: str, path: str) -> contract.LoraResult: ...
    async def unload_lora(self, name: str) -> contract.LoraResult: ...
    async def sleep(self) -> contract.EngineSleepState: ...
    async def wake(self) -> contract.EngineSleepState: ...
    async def shutdown(self, timeout_s: float = 10.0) -> None: ...
    async def kill(self) -> None: ...


EngineFactory = Callable[[EnginePlan], EngineClient]


class OutputSink:
    """Where a replica puts the outputs of one API request's engine requests (one per prompt) for its one consumer.

    While the consumer is busy, the updates of each engine request merge into one (`RequestOutput.add`): under load
    one wake-up, and one SSE chunk, carries several steps' tokens, so that the front end's work follows the number
    of requests rather than of tokens. Within an engine request nothing is dropped or reordered. `observe` sees each
    step's update as it arrives, before any merge: latency metrics follow the engine's steps, as vLLM's do, not the
    consumer's pace.
    """

    def __init__(self, observe: Callable[[int, RequestOutput], None] | None = None):
        self._observe = observe
        self._outputs: dict[int, RequestOutput] = {}  # prompt index -> its updates not taken yet, merged
        self._errors: list[tuple[int, BaseException]] = []
        self._waiter: asyncio.Future | None = None

    def put(self, index: int, output: RequestOutput) -> None:
        """`output` is the processor's own object, which its next step changes: it is copied or merged now."""
        if self._observe is not None:
            self._observe(index, output)
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
