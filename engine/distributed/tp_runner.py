"""The engine side of tensor parallelism: rank 0's runner, which starts the other ranks and keeps them in step.

`TensorParallelRunner` stands where a `ModelRunner` stands in `EngineCore`. It starts one worker process per extra
rank (`engine.distributed.worker`), joins their process group, and before each collective operation of its own
runner (sizing the KV cache, capturing CUDA graphs, every step) broadcasts the same command to them, so every rank
runs the same forward on its shard. Every rank samples the same tokens from the same gathered logits and seeds, so
rank 0's results are the engine's. A worker that dies fails the engine (`WorkerDiedError`): its process exits and
its supervisor restarts the whole model.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import weakref

import msgspec
import torch

from engine import contract
from engine.config import EngineConfig
from engine.distributed import parallel_state
from engine.distributed.worker import worker_device
from engine.models.config import ModelConfig
from engine.runner import ModelRunner, PendingRunnerOutput

logger = logging.getLogger("kvbox.engine")
_encoder = msgspec.msgpack.Encoder()


class WorkerDiedError(RuntimeError):
    """A tensor-parallel worker process ended; the engine cannot go on without its shard."""


class TensorParallelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, device: torch.device):
        size = config.tensor_parallel_size
        init_method = parallel_state.free_tcp_address()
        self._workers = [
            subprocess.Popen([sys.executable, "-m", "engine.distributed.worker", str(rank), str(size), init_method,
                              worker_device(config.device, rank)])
            for rank in range(1, size)]
        self._stopping: list[bool] = []  # non-empty once the workers were told to stop
        self._finalizer = weakref.finalize(self, _stop, self._workers, self._stopping)
        parallel_state.init_tensor_parallel(0, size, init_method, device)
        self._send(contract.StartWorker(config))
        self.local = ModelRunner(config, model_config, device, tp_rank=0)

    def __getattr__(self, name: str):
        # Everything that runs no collective (the model, the request copies, graph sizes) is rank 0's.
        return getattr(self.local, name)

    def determine_num_kv_blocks(self) -> int:
        self._send(contract.DetermineNumKVBlocks())
        return parallel_state.min_over_ranks(self.local.determine_num_kv_blocks())

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self._send(contract.AllocateKVCache(num_blocks))
        self.local.allocate_kv_cache(num_blocks)

    def capture_cuda_graphs(self) -> None:
        self._send(contract.CaptureCudaGraphs())
        self.local.capture_cuda_graphs()

    def execute(self, scheduler_output: contract.SchedulerOutput) -> PendingRunnerOutput:
        self._send(contract.ExecuteStep(scheduler_output))
        return self.local.execute(scheduler_output)

    def shutdown(self) -> None:
        """Stops the workers and leaves the process group (a later engine in this process can form its own)."""
        if self._finalizer.alive:
            try:
                self._send(contract.StopWorker())
                self._stopping.append(True)
            except Exception:
                logger.warning("could not tell the tensor-parallel workers to stop; killing them")
            self._finalizer()

    def _send(self, command: contract.WorkerCommand) -> None:
        dead = [(rank, p.returncode) for rank, p in enumerate(self._workers, 1) if p.poll() is not None]
        if dead:
            raise WorkerDiedError("tensor-parallel worker(s) exited: " +
                                  ", ".join(f"rank {rank} (code {code})" for rank, code in dead))
        parallel_state.broadcast_bytes(_encoder.encode(command))


def _stop(workers: list[subprocess.Popen], stopping: list[bool]) -> None:
    """Waits for workers told to stop; kills those that were not (an engine dropped without `shutdown`)."""
    for process in workers:
        try:
            process.wait(timeout=10 if stopping else 0)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    parallel_state.destroy()
