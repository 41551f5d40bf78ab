"""Sleep level 1 of an engine, as vLLM defines it: the KV cache is freed and the weights leave the device for pinned
host memory (on a CPU engine they stay where they are: host memory already), so the process, its LoRA adapters and its
compiled kernels survive and a wake costs two copies instead of a load from disk.

The cache's contents are lost, so the prefix cache forgets every block. CUDA graphs hold the device addresses of
the weights and the cache they were captured with: the first sleep drops them, and the first wake places weights and
cache at fixed addresses (engine.sleep_rank) and captures them again; later sleeps keep the graphs (and their memory
pool) and a wake only maps memory back and copies the weights. A draft model sleeps with the served one: its
weights go to the host and its cache is freed, both placed again beside the target's (in the same fixed regions), so
its graphs are dropped, captured and kept with the target's. A tensor- or pipeline-parallel engine sleeps the same
way on every rank: rank 0 tells its workers (`SleepLevel1`), each moves its own shard, and a wake's graph capture,
when one is needed, is the usual broadcast one.
"""

from __future__ import annotations

import logging
import time

import torch

from engine.contract import EngineSleepState, SleepLevel1
from engine.distributed import parallel_state
from engine.distributed.tp_runner import TensorParallelRunner
from engine.runner import ModelRunner
from engine.sleep_rank import sleep_runner, wake_runner

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
        if core.has_unfinished_requests():
            raise SleepRefused("requests are still running")
        core.kv_manager.reset_prefix_cache()  # the blocks' contents go with the cache
        self._num_blocks = core.runner.kv_memory.num_blocks
        if isinstance(core.runner, TensorParallelRunner):  # every rank's host copy, once every rank has slept
            core.runner.send(SleepLevel1(asleep=True))
            self._host_bytes = parallel_state.sum_over_ranks(sleep_runner(core.runner.local))
        else:
            self._host_bytes = sleep_runner(core.runner)
        self.asleep = True

    def wake(self) -> None:
        core = self.core
        if not self.asleep:
            return
        if isinstance(core.runner, TensorParallelRunner):
            core.runner.send(SleepLevel1(asleep=False, num_blocks=self._num_blocks))
        graphs_kept = wake_runner(_local(core.runner), self._num_blocks)
        self._host_bytes = 0
        if core.runner.use_cuda_graphs and not graphs_kept:
            started = time.perf_counter()
            core.runner.capture_cuda_graphs()  # on every rank
            logger.info("wake: CUDA graphs captured in %.3f s", time.perf_counter() - started)
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
            device_memory_bytes=(torch.cuda.memory_reserved(core.device) + _fixed_bytes(core.runner)
                                 if core.device.type == "cuda" else 0))

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


def _fixed_bytes(runner: ModelRunner | TensorParallelRunner) -> int:
    """This rank's fixed-address memory (engine.device_region): mapped, it is the device's, though not torch's."""
    fixed = _local(runner).fixed_memory
    return fixed.mapped_bytes if fixed is not None else 0


def _local(runner: ModelRunner | TensorParallelRunner) -> ModelRunner:
    return runner.local if isinstance(runner, TensorParallelRunner) else runner
