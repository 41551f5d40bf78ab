"""Sleep level 1 of an engine, as vLLM defines it: the KV cache is freed and the weights leave the device for pinned
host memory (on a CPU engine they stay where they are: host memory already), so the process, its LoRA adapters and its
compiled kernels survive and a wake costs two copies instead of a load from disk.

The cache's contents are lost, so the prefix cache forgets every block. CUDA graphs hold the device addresses of
the weights and the cache they were captured with; those change across a sleep, so the graphs are dropped with the
memory they pinned and captured again on wake (kernels stay compiled, so this is the cheap part of a start). Only a
single-rank engine sleeps at level 1; a tensor-parallel one is refused (its workers hold shards the commands to
move them do not exist for yet).
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from engine.contract import EngineSleepState
from engine.runner import ModelRunner

logger = logging.getLogger(__name__)


class SleepRefused(RuntimeError):
    pass


class EngineSleep:
    """Level-1 sleep and wake of one `EngineCore`; `state()` is what the engine reports of its memory."""

    def __init__(self, core):
        self.core = core
        self.asleep = False
        self._num_blocks = 0
        self._host_bytes = 0

    def sleep(self) -> None:
        core = self.core
        if self.asleep:
            return
        if not isinstance(core.runner, ModelRunner):
            raise SleepRefused("sleep level 1 is not supported with tensor parallelism; use level 2")
        if core.has_unfinished_requests():
            raise SleepRefused("requests are still running")
        runner = core.runner
        core.kv_manager.reset_prefix_cache()  # the blocks' contents go with the cache
        self._num_blocks = runner.kv_memory.num_blocks
        runner.kv_memory.release()
        if core.device.type == "cuda":
            runner.cuda_graphs.release()
            self._host_bytes = _move_weights(runner.model, torch.device("cpu"))
            torch.cuda.synchronize(core.device)
            torch.cuda.empty_cache()
        self.asleep = True

    def wake(self) -> None:
        core = self.core
        if not self.asleep:
            return
        runner = core.runner
        if core.device.type == "cuda":
            _move_weights(runner.model, core.device)
            self._host_bytes = 0
            # Pinned blocks go back to torch's host cache when freed; an awake engine should not hold a copy of its
            # weights there (the next sleep allocates again).
            torch.accelerator.empty_host_cache()
        runner.kv_memory.allocate(self._num_blocks)
        if runner.use_cuda_graphs:
            runner.capture_cuda_graphs()
        self.asleep = False

    def state(self, seconds: float = 0.0, error: str = "") -> EngineSleepState:
        core = self.core
        kv_memory = core.runner.kv_memory
        on_device = core.device.type != "cpu"
        weights_here = not (self.asleep and on_device)
        return EngineSleepState(
            asleep=self.asleep, level=1 if self.asleep else 0,
            weight_bytes=core.weight_bytes if weights_here else 0,
            kv_cache_bytes=0 if self.asleep else kv_memory.num_blocks * kv_memory.bytes_per_block,
            host_copy_bytes=self._host_bytes, seconds=seconds, error=error,
            device_memory_bytes=torch.cuda.memory_reserved(core.device) if core.device.type == "cuda" else 0)

    def handle(self, sleep: bool) -> EngineSleepState:
        """Sleeps or wakes; a refusal is reported in the state, not raised."""
        started = time.perf_counter()
        try:
            self.sleep() if sleep else self.wake()
        except SleepRefused as e:
            return self.state(error=str(e))
        seconds = time.perf_counter() - started
        logger.info("engine %s in %.2f s", "asleep (level 1)" if sleep else "awake", seconds)
        return self.state(seconds)


@torch.no_grad()
def _move_weights(model: nn.Module, device: torch.device) -> int:
    """Moves every parameter and buffer (each once, however many modules share it) to `device`, pinned when it is
    the host so that the copy back runs at full bandwidth; returns the bytes moved."""
    moved: dict[int, torch.Tensor] = {}
    total = 0
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None and id(param) not in moved:
                param.data = _copy(param.data, device)
                moved[id(param)] = param
                total += param.numel() * param.element_size()
        for name, buffer in module._buffers.items():
            if buffer is None:
                continue
            if id(buffer) not in moved:
                moved[id(buffer)] = _copy(buffer, device)
                total += buffer.numel() * buffer.element_size()
            module._buffers[name] = moved[id(buffer)]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return total


def _copy(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return tensor.to("cpu").pin_memory()
    return tensor.to(device, non_blocking=True)
