"""Offline data parallelism: `LLM(model, data_parallel_size=N)` runs N whole engines in this process, one device
each, behind the engine core's interface.

Each request goes to the replica with the least outstanding work (prompt tokens plus tokens still to generate); a
request that forks a kept request's K/V (beam search's steps) goes where its parent's blocks are. `step` steps every
replica that has work: on GPUs each step's launches return before the device finishes (async scheduling), so while
one replica's host work runs the others' devices compute. On a CPU the replicas share the process's cores and take
turns, which keeps the results but gains no speed: serving (`parallelism.data`) runs a process per replica.

vLLM's offline `data_parallel_size` starts a process per replica; replicas of one process keep this module small and
the offline API free of IPC. Each replica holds one rank (tensor and pipeline parallel replicas are the appliance's).
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import torch

from engine.config import EngineConfig, EngineConfigError
from engine.contract import EngineCoreOutput
from engine.core import EngineCore
from engine.device import torch_device
from engine.request import RequestStatus
from engine.sampling_params import SamplingParams


def replica_devices(device: str, size: int) -> list[str]:
    """Replica r on cuda:r; every replica on the CPU when the engine computes there."""
    if torch_device(device).type != "cuda":
        return [device] * size
    available = torch.cuda.device_count()
    if available < size:
        raise EngineConfigError("data_parallel_size", f"{size} replicas need {size} GPUs, {available} visible")
    return [f"cuda:{replica}" for replica in range(size)]


def _on(device: str):
    """The replica's device as the current one while it works: Triton launches, CUDA graphs and streams follow the
    current device, not the tensors'."""
    target = torch_device(device)
    return torch.cuda.device(target) if target.type == "cuda" else contextlib.nullcontext()


class DataParallelCores:
    def __init__(self, config: EngineConfig):
        self._devices = replica_devices(config.device, config.data_parallel_size)
        self.replicas = []
        for device in self._devices:
            with _on(device):
                self.replicas.append(EngineCore(replace(config, device=device, data_parallel_size=1)))
        self._replica_of: dict[str, int] = {}  # live sample id -> replica
        self._cost: dict[str, int] = {}  # live sample id -> its tokens (prompt + the most it may generate)
        self._load = [0] * len(self.replicas)
        self._kept: dict[str, int] = {}  # requests whose K/V outlives them (keep_kv) -> replica

    @property
    def max_model_len(self) -> int:
        return self.replicas[0].max_model_len

    @property
    def vocab_size(self) -> int:
        return self.replicas[0].vocab_size

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self.replicas[0].eos_token_ids

    @property
    def pooler_info(self):
        return self.replicas[0].pooler_info

    @property
    def kv_usage(self) -> float:
        return sum(replica.kv_usage for replica in self.replicas) / len(self.replicas)

    @property
    def weight_bytes(self) -> int:
        """One replica's (each holds them all)."""
        return self.replicas[0].weight_bytes

    @property
    def step_seconds(self) -> float:
        return sum(replica.step_seconds for replica in self.replicas)

    @property
    def device_wait_seconds(self) -> float:
        return sum(replica.device_wait_seconds for replica in self.replicas)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    kv_parent: str | None = None, keep_kv: bool = False, **options) -> list[str]:
        if kv_parent is not None and kv_parent in self._kept:
            replica = self._kept[kv_parent]
        else:
            replica = min(range(len(self.replicas)), key=self._load.__getitem__)
        with _on(self._devices[replica]):
            sample_ids = self.replicas[replica].add_request(request_id, prompt_token_ids, params,
                                                            kv_parent=kv_parent, keep_kv=keep_kv, **options)
        to_generate = min(self.max_model_len - len(prompt_token_ids), params.max_tokens or self.max_model_len)
        for sample_id in sample_ids:
            self._replica_of[sample_id] = replica
            self._cost[sample_id] = len(prompt_token_ids) + max(0, to_generate)
            self._load[replica] += self._cost[sample_id]
        if keep_kv:
            self._kept[request_id] = replica
        return sample_ids

    def has_unfinished_requests(self) -> bool:
        return any(replica.has_unfinished_requests() for replica in self.replicas)

    def step(self) -> list[EngineCoreOutput]:
        outputs = []
        for device, replica in zip(self._devices, self.replicas):
            if replica.has_unfinished_requests():
                with _on(device):
                    outputs += replica.step()
        for output in outputs:
            if output.finish_reason is not None:
                self._forget(output.request_id)
        return outputs

    def finish_requests(self, sample_ids: list[str], status: RequestStatus = RequestStatus.FINISHED_STOPPED) -> None:
        for replica, ids in self._by_replica(sample_ids, self._replica_of).items():
            with _on(self._devices[replica]):
                self.replicas[replica].finish_requests(ids, status)
        for sample_id in sample_ids:
            self._forget(sample_id)

    def release_kv(self, request_ids: list[str]) -> None:
        for replica, ids in self._by_replica(request_ids, self._kept).items():
            with _on(self._devices[replica]):
                self.replicas[replica].release_kv(ids)
        for request_id in request_ids:
            self._kept.pop(request_id, None)

    def add_lora(self, name: str, path: str) -> None:
        for device, replica in zip(self._devices, self.replicas):
            with _on(device):
                replica.add_lora(name, path)

    def shutdown(self) -> None:
        for device, replica in zip(self._devices, self.replicas):
            with _on(device):
                replica.shutdown()

    def _forget(self, sample_id: str) -> None:
        replica = self._replica_of.pop(sample_id, None)
        if replica is not None:
            self._load[replica] -= self._cost.pop(sample_id)

    @staticmethod
    def _by_replica(ids: list[str], where: dict[str, int]) -> dict[int, list[str]]:
        grouped: dict[int, list[str]] = {}
        for request_id in ids:
            if request_id in where:
                grouped.setdefault(where[request_id], []).append(request_id)
        return grouped
