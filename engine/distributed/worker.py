"""A parallel worker: one rank (1..) of an engine, as
`python -m engine.distributed.worker RANK TP_SIZE PP_SIZE ADDR DEVICE COLLECTIVE_TIMEOUT_S HEARTBEAT_TIMEOUT_S`.

Started by the engine process (rank 0, `tp_runner.TensorParallelRunner`), or on another machine by that node's
`kvbox serve --node-rank R` (`appliance.node`). It builds its shard of its pipeline stage's layers and their share of
the KV cache, then carries out each `WorkerCommand` that rank 0 sends, in order: the model's collectives pair each
rank's forward with the others', and each stage takes its activations from the one before. With pipeline stages
rank 0 runs ahead of the later stages (several steps in flight), so their commands wait, already sent, until the
stage is done with the steps before. It holds no request state but the runner's copies, kept from the steps' plain
data. The first rank of the last stage posts each step's output to rank 0 (with pipeline stages); every other
rank's sampled tokens equal its and are dropped. It ends with rank 0: on `StopWorker`, when a receive fails (rank 0
died), when its parent process dies, or when rank 0's heartbeat stops (`engine.distributed.heartbeat`: a node 0
that froze or left the network closes no connection, and a worker waiting for its next command waits without limit).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

import msgspec
import torch

from engine import contract
from engine.distributed import parallel_state
from engine.distributed.heartbeat import Heartbeat
from engine.distributed.progress import PROGRESS
from engine.distributed.stage_trace import StageTrace, traced
from engine.models.config import ModelConfig
from engine.runner import ModelRunner
from engine.sleep_rank import sleep_runner, wake_runner

logger = logging.getLogger("kvbox.worker")
_PR_SET_PDEATHSIG = 1
_decoder = msgspec.msgpack.Decoder(contract.WorkerCommand)
_encoder = msgspec.msgpack.Encoder()


def _die_with_parent() -> None:
    """Linux ends this process when the engine process that started it dies, however it dies."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def receive() -> contract.WorkerCommand:
    return _decoder.decode(parallel_state.receive_command())


def serve(rank: int, tp_size: int, pp_size: int, device: torch.device) -> None:
    start = receive()
    assert isinstance(start, contract.StartWorker), start
    config = start.engine_config
    torch.manual_seed(config.seed)
    dtype = None if config.dtype == "auto" else config.dtype
    model_config = ModelConfig.from_pretrained(config.model, dtype=dtype, max_model_len=config.max_model_len)
    stage, tp_rank = parallel_state.stage_and_tp_rank(rank, tp_size)
    runner = ModelRunner(config, model_config, device, start.pooler_info, tp_rank=tp_rank, pp_rank=stage)
    answers = rank == parallel_state.answering_rank(tp_size, pp_size)
    trace = StageTrace.from_env(rank)
    while not isinstance(command := receive(), contract.StopWorker):
        if isinstance(command, contract.ExecuteStep):
            with traced(trace, command.scheduler_output.step_id), PROGRESS.busy():
                output = runner.execute(command.scheduler_output)
                answer = _encoder.encode(output.get()) if answers else None
            if answer is not None:
                parallel_state.send_bytes(answer, 0)
        elif isinstance(command, contract.DetermineNumKVBlocks):
            parallel_state.min_over_ranks(runner.determine_num_kv_blocks())
        elif isinstance(command, contract.AllocateKVCache):
            runner.allocate_kv_cache(command.num_blocks)
        elif isinstance(command, contract.CaptureCudaGraphs):
            runner.capture_cuda_graphs()
        elif isinstance(command, contract.LoadLoraShard):
            runner.lora.add_shard(command)
        elif isinstance(command, contract.FreeLoraVersions):
            runner.lora.free(command)
        elif isinstance(command, contract.SleepLevel1) and command.asleep:
            parallel_state.sum_over_ranks(sleep_runner(runner))
        elif isinstance(command, contract.SleepLevel1):
            wake_runner(runner, command.num_blocks)
    if trace is not None:
        trace.write()


def worker_device(device: str, local_rank: int) -> str:
    """A node's i-th rank takes the i-th device after the one configured for rank 0 (cuda -> cuda:i, cuda:2 ->
    cuda:2+i); on node 0 i is the rank, on other nodes the rank less the node's first (engine.distributed.nodes)."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return "cpu"
    first = int(device.partition(":")[2] or 0) if device.startswith("cuda") else 0
    return f"cuda:{first + local_rank}"


def _end_without_rank_0(rank: int, reason: str) -> None:
    logger.error("rank 0 is lost (%s): this rank ends", reason)
    logging.shutdown()
    os._exit(1)  # its main thread may wait in a receive that nothing will end


def main(argv: list[str]) -> int:
    _die_with_parent()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rank, tp_size, pp_size, init_method, device = int(argv[0]), int(argv[1]), int(argv[2]), argv[3], argv[4]
    parallel_state.init_parallel(rank, tp_size, pp_size, init_method, torch.device(device), float(argv[5]))
    heartbeat = Heartbeat(init_method, rank, [0], float(argv[6]), _end_without_rank_0)
    try:
        serve(rank, tp_size, pp_size, torch.device(device))
    except Exception:
        logger.exception("parallel rank %d failed", rank)
        return 1
    finally:
        heartbeat.stop()
        parallel_state.destroy()
    return 0


if __name__ == "__main__":
    # Skip interpreter teardown (CUDA contexts, process-group threads) once the loop has ended.
    os._exit(main(sys.argv[1:]))
