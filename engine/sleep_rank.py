"""One rank's part of a level-1 sleep (engine.sleep): on the engine process for its own runner, on a parallel
worker when rank 0 sends `SleepLevel1`.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.runner import ModelRunner


def sleep_runner(runner: ModelRunner) -> int:
    """One rank's part of a level-1 sleep: its KV cache freed, its graphs dropped, its weights to pinned host memory;
    returns the bytes copied to the host."""
    runner.kv_memory.release()
    if runner.device.type != "cuda":
        return 0
    runner.cuda_graphs.release()
    host_bytes = _move_weights(runner.model, torch.device("cpu"))
    torch.cuda.synchronize(runner.device)
    torch.cuda.empty_cache()
    return host_bytes


def wake_runner(runner: ModelRunner, num_blocks: int) -> None:
    """One rank's part of a wake, but the graph capture (a collective with tensor parallelism: the caller's)."""
    if runner.device.type == "cuda":
        _move_weights(runner.model, runner.device)
        # Pinned blocks go back to torch's host cache when freed; an awake engine should not hold a copy of its
        # weights there (the next sleep allocates again).
        _empty_host_cache()
    runner.kv_memory.allocate(num_blocks)


def _empty_host_cache() -> None:
    # torch.accelerator.empty_host_cache is recent: older torch (the GPU machine's 2.11 may be one) has only the
    # private CUDA call, and a wake must not fail on the name.
    empty = getattr(torch.accelerator, "empty_host_cache", None) or getattr(torch._C, "_host_emptyCache", None)
    if empty is not None:
        empty()


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
