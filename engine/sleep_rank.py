"""One rank's part of a level-1 sleep (engine.sleep): on the engine process for its own runner, on a parallel
worker when rank 0 sends `SleepLevel1`.

On CUDA the first wake puts the weights and the KV cache in fixed-address regions (engine.device_region) and
captures the graphs on them once more; from then on a sleep unmaps the regions' memory and a wake maps new memory
at the same addresses, copies the weights back and zeroes the cache, and the graphs replay as captured: a wake
costs the weights' copy, not a capture. Where the driver has no virtual memory management, every wake captures.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from torch import nn

from engine import cpu_heap
from engine.device_region import BumpAllocator, DeviceRegion, RegionError, aligned
from engine.runner import ModelRunner

logger = logging.getLogger(__name__)


def sleep_runner(runner: ModelRunner) -> int:
    """One rank's part of a level-1 sleep: its KV cache freed, its weights (a draft model's too) to pinned host
    memory, its graphs dropped unless they live on fixed addresses; returns the bytes copied to the host."""
    runner.kv_memory.release()
    if runner.device.type == "cpu":
        cpu_heap.release_freed_memory()  # the cache's pages, which the heap keeps while the engine serves
    if runner.device.type != "cuda":
        return 0
    if runner.fixed_memory is None:
        runner.release_cuda_graphs()
    host_bytes = _move_weights(_weights(runner),
                               lambda i, t: torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t))
    if runner.fixed_memory is not None:
        runner.fixed_memory.unmap()
    torch.cuda.synchronize(runner.device)
    torch.cuda.empty_cache()
    return host_bytes


def wake_runner(runner: ModelRunner, num_blocks: int) -> bool:
    """One rank's part of a wake, but the graph capture (a collective with tensor parallelism: the caller's).
    Returns whether the graphs survived the sleep (every rank answers alike: the same history, the same driver)."""
    if runner.device.type != "cuda":
        runner.kv_memory.allocate(num_blocks)
        return False
    phases = _Phases(runner.device)
    fixed = runner.fixed_memory
    kept = fixed is not None and fixed.fits(runner, num_blocks)
    if fixed is not None and not kept:  # the weights' or the cache's shapes changed: new regions, new graphs
        runner.release_cuda_graphs()
        fixed.close()
        fixed = runner.fixed_memory = None
    if fixed is None:
        fixed = runner.fixed_memory = FixedMemory.create(runner, num_blocks)
    if fixed is None:
        _move_weights(_weights(runner), lambda i, t: t.to(runner.device, non_blocking=True))
        phases.mark("weights")
        runner.kv_memory.allocate(num_blocks, show_progress=False)
    else:
        fixed.map()
        phases.mark("map")  # on a first wake, the regions' creation
        _move_weights(_weights(runner), lambda i, t: fixed.weights[i].copy_(t, non_blocking=True))
        phases.mark("weights")
        runner.kv_memory.allocate(num_blocks, show_progress=False, take=BumpAllocator(fixed.kv_region).take)
    phases.mark("kv_cache")
    # The weights' pinned host blocks return to torch's host cache, which keeps them for the next sleep's copies:
    # giving them back to the driver (cudaFreeHost of an 8B model's 16 GB) took 1.6 of a 2.0 s wake on an H200, and
    # the host must hold that copy whenever the engine sleeps anyway.
    logger.info("wake: %s; CUDA graphs %s", phases, "kept" if kept else "to capture")
    return kept


class _Phases:
    """Seconds per phase of a wake, each measured to its device work's end (the log says where a wake went)."""

    def __init__(self, device: torch.device):
        self.device, self.seconds, self._last = device, {}, time.perf_counter()

    def mark(self, name: str) -> None:
        torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[name], self._last = now - self._last, now

    def __str__(self) -> str:
        return " ".join(f"{name}={s:.3f}s" for name, s in self.seconds.items())


class FixedMemory:
    """A rank's weights and KV cache in two fixed-address regions, with the layout they were placed in."""

    def __init__(self, weights_region: DeviceRegion, weights: list[torch.Tensor], kv_region: DeviceRegion,
                 signature: tuple):
        self.weights_region, self.weights, self.kv_region, self.signature = (weights_region, weights, kv_region,
                                                                              signature)

    @classmethod
    def create(cls, runner: ModelRunner, num_blocks: int) -> FixedMemory | None:
        """The regions for the runner's (host-resident) weights and a cache of `num_blocks`; None where the
        driver refuses, and the wake keeps to torch's allocator."""
        tensors = _unique_tensors(_weights(runner))
        kv_shapes = runner.kv_memory.layer_shapes(num_blocks)
        try:
            weights_region = DeviceRegion(sum(aligned(t.nbytes) for t in tensors), runner.device)
            try:
                kv_region = DeviceRegion(sum(aligned(torch.Size(s).numel() * d.itemsize) for s, d in kv_shapes),
                                         runner.device)
            except RegionError:
                weights_region.close()
                raise
        except RegionError as e:
            logger.warning("sleep: no fixed-address device memory (%s); each wake captures the CUDA graphs again", e)
            return None
        bump = BumpAllocator(weights_region)
        views = [bump.take(t.shape, t.dtype) for t in tensors]
        return cls(weights_region, views, kv_region, _signature(runner, num_blocks))

    @property
    def mapped_bytes(self) -> int:
        return sum(r.size for r in (self.weights_region, self.kv_region) if r.mapped)

    def fits(self, runner: ModelRunner, num_blocks: int) -> bool:
        return self.signature == _signature(runner, num_blocks)

    def map(self) -> None:
        self.weights_region.map()
        self.kv_region.map()

    def unmap(self) -> None:
        self.weights_region.unmap()
        self.kv_region.unmap()

    def close(self) -> None:
        self.weights_region.close()
        self.kv_region.close()


def _signature(runner: ModelRunner, num_blocks: int) -> tuple:
    return (tuple((tuple(t.shape), t.dtype) for t in _unique_tensors(_weights(runner))),
            tuple(runner.kv_memory.layer_shapes(num_blocks)))


def _weights(runner: ModelRunner) -> nn.Module:
    """The rank's weights: the served model's and a draft model's, as one module tree so that each tensor moves once
    and both sets of graphs find theirs at the same addresses after a wake."""
    draft = runner.draft_model
    return runner.model if draft is None else nn.ModuleList([runner.model, draft.model])


def _unique_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter's and buffer's tensor, each once however many modules share it, in `_move_weights`' order."""
    seen: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None and id(param) not in seen:
                seen[id(param)] = param.data
        for buffer in module._buffers.values():
            if buffer is not None and id(buffer) not in seen:
                seen[id(buffer)] = buffer
    return list(seen.values())


@torch.no_grad()
def _move_weights(model: nn.Module, place: Callable[[int, torch.Tensor], torch.Tensor]) -> int:
    """Replaces every parameter's and buffer's tensor (each once, however many modules share it) by
    `place(index, tensor)`, the index counting unique tensors in module order; returns the bytes moved."""
    moved: dict[int, torch.Tensor] = {}
    replaced = []  # alive until the end: a freed buffer's id could come back as a new tensor's and match
    total = 0
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None and id(param) not in moved:
                moved[id(param)] = param
                total += param.nbytes
                param.data = place(len(moved) - 1, param.data)
        for name, buffer in module._buffers.items():
            if buffer is None:
                continue
            if id(buffer) not in moved:
                total += buffer.nbytes
                replaced.append(buffer)
                moved[id(buffer)] = place(len(moved), buffer)
            module._buffers[name] = moved[id(buffer)]
    return total
