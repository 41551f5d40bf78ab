"""Which LoRA adapters the engine serves, which version each request uses, and which ones sit in the GPU slots.

A name maps to its current version. Every loaded version has its own adapter id, which requests carry and the
prefix cache hashes, so K/V computed with one version is never reused by another. Replacing or removing a name
retires its version: requests that already hold it keep it until they finish, then `drop_unused` frees it.

Usage is counted per name for the engine's life, over all its versions (the tokens a replaced version still
computes for its running requests included) and across removing and loading the name again: the counters never go
back while the engine runs, which is what the appliance's Prometheus counters are built on.

Every loaded adapter stays in host memory (at most `max_cpu_loras` names); up to `max_loras` of them sit in the GPU
slots. Before each step `activate` gives the step's adapters a slot, copying in those that are not resident over
the least recently used ones the step does not need. The scheduler sees to it that no step needs more than
`max_loras`, so a request for an adapter that is not resident waits rather than fails.

With tensor parallelism or pipeline stages every rank has a manager over its shards or its stage's layers. Rank 0's
decides (names, versions, checks); the others load and free the versions it tells them to, by id, and each gives a
step's adapters slots of its own.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass


from engine.config import EngineConfig
from engine.lora.adapter import LoraAdapter, load_adapter
from engine.contract import FreeLoraVersions, LoadLoraShard, LoraInfo, WorkerCommand
from engine.lora.layers import LoraLinear
from engine.sampling_params import InvalidParameterError


_VERSION_SEP = "@"


def adapter_name(adapter_id: str) -> str:
    """The served name of an adapter version's id (`name@N`)."""
    return adapter_id.rpartition(_VERSION_SEP)[0]


@dataclass
class _Usage:
    num_requests: int = 0
    num_tokens: int = 0
    num_slot_loads: int = 0


@dataclass
class _Version:
    adapter: LoraAdapter
    usage: _Usage  # its name's, shared by all versions


class LoraManager:
    def __init__(self, layers: dict[str, LoraLinear], lora_modules: Mapping[str, tuple[str, ...]],
                 config: EngineConfig, remote: Mapping[str, LoraLinear] | None = None):
        self.layers = layers
        self.remote = remote or {}  # other pipeline stages' linears, by a twin here (`other_stage_twins`)
        self.lora_modules = lora_modules
        self.max_loras = config.max_loras
        self.max_rank = config.max_lora_rank
        self.max_cpu_loras = config.max_cpu_loras
        self.dtype = next(iter(layers.values())).lora_a.dtype
        self._current: dict[str, _Version] = {}  # name -> its current version
        self._usage: dict[str, _Usage] = {}  # name -> its usage, kept when the name is removed
        self._versions: dict[str, _Version] = {}  # adapter id -> every loaded version, current or retired
        self._slots: OrderedDict[str, int] = OrderedDict()  # resident adapter id -> slot, least recently used first
        self._free_slots = list(range(self.max_loras))
        self._version_numbers = itertools.count(1)
        # Set by rank 0's tensor-parallel runner: the other ranks load and free the same versions (`add_shard`, `free`).
        self.broadcast: Callable[[WorkerCommand], None] | None = None

    def add(self, name: str, path: str) -> None:
        """Loads the adapter at `path` as the current version of `name`; raises ValueError, changing nothing, when
        the adapter is bad or host memory already holds `max_cpu_loras` other adapters."""
        if not name:
            raise ValueError("a LoRA adapter needs a non-empty name")
        if name not in self._current and len(self._current) >= self.max_cpu_loras:
            raise ValueError(f"cannot load LoRA adapter {name!r}: {len(self._current)} adapters are loaded, as many as "
                             f"max_cpu_loras allows; remove one first")
        adapter = load_adapter(name, f"{name}{_VERSION_SEP}{next(self._version_numbers)}", path, self.layers,
                               self.lora_modules, self.max_rank, self.dtype, self.remote)
        self._current[name] = self._keep(adapter)
        if self.broadcast is not None:
            self.broadcast(LoadLoraShard(name, adapter.adapter_id, adapter.path))

    def add_shard(self, command: LoadLoraShard) -> None:
        """Another rank's side of `add`: this rank's shard of a version that rank 0 has loaded and checked."""
        self._keep(load_adapter(command.name, command.adapter_id, command.path, self.layers, self.lora_modules,
                                self.max_rank, self.dtype, self.remote))

    def _keep(self, adapter: LoraAdapter) -> _Version:
        self._versions[adapter.adapter_id] = _Version(adapter, self._usage.setdefault(adapter.name, _Usage()))
        return self._versions[adapter.adapter_id]

    def remove(self, name: str) -> None:
        if name not in self._current:
            raise ValueError(f"no LoRA adapter named {name!r}")
        del self._current[name]

    def resolve(self, name: str) -> str:
        """The adapter id that a new request for `name` uses (and counts the request)."""
        version = self._current.get(name)
        if version is None:
            raise InvalidParameterError("model", f"unknown LoRA adapter {name!r}")
        version.usage.num_requests += 1
        return version.adapter.adapter_id

    def list(self) -> list[LoraInfo]:
        return [LoraInfo(name, v.adapter.adapter_id, v.adapter.path, v.adapter.rank,
                         self._slots.get(v.adapter.adapter_id), v.usage.num_requests, v.usage.num_tokens,
                         v.usage.num_slot_loads)
                for name, v in self._current.items()]

    @property
    def has_retired(self) -> bool:
        return len(self._versions) > len(self._current)

    def drop_unused(self, live_ids: set[str]) -> None:
        """Frees retired versions that no unfinished request (`live_ids`) holds any more."""
        keep = live_ids | {v.adapter.adapter_id for v in self._current.values()}
        unused = FreeLoraVersions([i for i in self._versions if i not in keep])
        self.free(unused)
        if unused.adapter_ids and self.broadcast is not None:
            self.broadcast(unused)

    def free(self, command: FreeLoraVersions) -> None:
        for adapter_id in command.adapter_ids:
            del self._versions[adapter_id]
            slot = self._slots.pop(adapter_id, None)
            if slot is not None:
                self._free_slots.append(slot)

    def activate(self, num_tokens: Mapping[str, int]) -> dict[str, int]:
        """Gives each adapter of a step (adapter id -> its tokens in the step) a GPU slot; returns id -> slot."""
        assert len(num_tokens) <= self.max_loras, "one step uses more adapters than there are GPU slots"
        for adapter_id, count in num_tokens.items():
            version = self._versions[adapter_id]
            version.usage.num_tokens += count
            if adapter_id in self._slots:
                self._slots.move_to_end(adapter_id)
            else:
                self._load(version, self._take_slot(num_tokens))
        return {adapter_id: self._slots[adapter_id] for adapter_id in num_tokens}

    def _take_slot(self, needed: Mapping[str, int]) -> int:
        if self._free_slots:
            return self._free_slots.pop(0)
        victim = next(adapter_id for adapter_id in self._slots if adapter_id not in needed)
        return self._slots.pop(victim)

    def _load(self, version: _Version, slot: int) -> None:
        for module, layer in self.layers.items():
            layer.load_slot(slot, version.adapter.weights.get(module))
        self._slots[version.adapter.adapter_id] = slot
        version.usage.num_slot_loads += 1
