"""The engine side of tensor and pipeline parallelism: rank 0's runner, which starts the other ranks and keeps them
in step.

`TensorParallelRunner` stands where a `ModelRunner` stands in `EngineCore`. It starts one worker process per extra
rank (`engine.distributed.worker`), joins their process group, and before each collective operation of its own
runner (sizing the KV cache, capturing CUDA graphs, every step) sends the same command to them, so every rank
runs the same forward on its shard; the LoRA adapter versions rank 0 loads or frees, every rank loads (its own
shard) or frees. Every rank of a stage samples the same tokens from the same gathered logits and seeds; with
speculative decoding each rank verifies the step's drafts in the same multi-token forward (a draft model runs
whole on every rank, `engine.spec_decode.draft_model`). Without pipeline stages rank 0's results are the engine's;
with them rank 0 holds the first stage, and the first rank of the last stage sends each step's `ModelRunnerOutput`
back as msgpack bytes. A worker that dies (before the rendezvous too), hangs (stopped: killed by
`engine.distributed.watchdog`; silent, its heartbeat stopped, or stuck in a step its tensor-parallel group waits
for: killed, `engine.distributed.heartbeat`; otherwise until the collective timeout) or a step that fails on any
rank fails the engine (`WorkerDiedError`): its process exits and
its supervisor restarts the whole model. Across machines (`nnodes` above 1) it starts only node 0's ranks; a
communication failure with a rank elsewhere counts as that rank's death, and so does its silence (a machine gone
from the network closes no connection): in an engine process (`exit_process_on_lost_rank`) that ends the process at
once, since its collectives cannot be interrupted, and offline the next parallel operation raises. The restarted
engine waits at the rendezvous for the other nodes' ranks to rejoin.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Iterator

import msgspec
import torch

from engine import contract
from engine.config import EngineConfig, EngineConfigError
from engine.distributed import nodes, parallel_state
from engine.distributed.heartbeat import Heartbeat
from engine.distributed.progress import PROGRESS
from engine.distributed.stage_trace import StageTrace, traced
from engine.distributed.watchdog import StoppedRankWatchdog
from engine.distributed.worker import worker_device
from engine.models.config import ModelConfig
from engine.runner import ModelRunner, PendingRunnerOutput

logger = logging.getLogger("kvbox.engine")
_encoder = msgspec.msgpack.Encoder()
_output_decoder = msgspec.msgpack.Decoder(contract.ModelRunnerOutput)
# A communication error lets the process it lost this long to show as exited.
_EXIT_GRACE_S = 2.0
_LOST_RANK_EXIT_CODE = 3  # appliance.engine_process's code for a lost worker: its supervisor restarts the model
_report_before_exit: Callable[[str], None] | None = None  # set: a lost remote rank ends the process


def exit_process_on_lost_rank(report: Callable[[str], None]) -> None:
    """For a process that holds only its engine (appliance.engine_process): a rank on another node that goes
    silent ends the process at once, after `report(why)`, rather than after the collective it may be waiting in
    times out (gloo's waits cannot be interrupted from another thread). Offline, the user's process is left alone."""
    global _report_before_exit
    _report_before_exit = report


class WorkerDiedError(RuntimeError):
    """A worker process ended; the engine cannot go on without its shard or stage."""


class TensorParallelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, device: torch.device,
                 pooler_info: contract.PoolerInfo | None = None):
        tp_size, pp_size = config.tensor_parallel_size, config.pipeline_parallel_size
        world_size = tp_size * pp_size
        if torch.distributed.is_initialized():
            # Checked before anything starts: the failed engine's clean-up would leave the running one's group.
            raise RuntimeError("a process holds one tensor- or pipeline-parallel engine at a time (its process group "
                               "is the process's default one): shut the running one down first (LLM.shutdown())")
        if config.nnodes > 1:  # the other nodes' `kvbox serve --node-rank R` start theirs (appliance.node)
            init_method = nodes.rendezvous_address(config.master_addr, config.master_port)
            self._worker_ranks = list(nodes.node_ranks(world_size, config.nnodes, 0))[1:]
        else:
            init_method = parallel_state.free_tcp_address()
            self._worker_ranks = list(range(1, world_size))
        self._remote = len(self._worker_ranks) < world_size - 1  # ranks this process cannot watch
        _check_devices(config, device, 1 + len(self._worker_ranks))
        self._workers = [
            subprocess.Popen([sys.executable, "-m", "engine.distributed.worker", str(rank), str(tp_size), str(pp_size),
                              init_method, worker_device(config.device, rank), str(config.collective_timeout_s),
                              str(config.rank_heartbeat_timeout_s)])
            for rank in self._worker_ranks]
        self._stopping: list[bool] = []  # non-empty once the workers were told to stop
        self._watchdog = StoppedRankWatchdog(self._workers.copy, "parallel workers")
        self._silenced: dict[int, str] = {}  # pid -> why its heartbeat's silence had it killed
        self._lost_remote: list[str] = []  # ranks on other nodes gone silent
        self._heartbeats: list[Heartbeat] = []  # one, once the ranks have met
        self._finalizer = weakref.finalize(self, _stop, self._workers, self._stopping, self._watchdog,
                                           self._heartbeats)
        try:
            parallel_state.init_parallel(0, tp_size, pp_size, init_method, device, config.collective_timeout_s,
                                         check_peers=self.check_workers)
            groups = [list(range(stage * tp_size, (stage + 1) * tp_size)) for stage in range(pp_size)]
            self._heartbeats.append(Heartbeat(init_method, 0, list(range(1, world_size)),
                                              config.rank_heartbeat_timeout_s, self._rank_lost, groups))
            self.send(contract.StartWorker(config, pooler_info))
            self.local = ModelRunner(config, model_config, device, pooler_info)
        except BaseException:
            self._finalizer()  # now, not when the traceback lets go of this half-built runner
            raise
        if self.local.lora is not None:
            self.local.lora.broadcast = self.send
        self._answering_rank = parallel_state.answering_rank(tp_size, pp_size)
        self._trace = StageTrace.from_env(0)

    def __getattr__(self, name: str):
        # Everything that runs no collective (the model, the request copies, graph sizes) is rank 0's.
        return getattr(self.local, name)

    def determine_num_kv_blocks(self) -> int:
        self.send(contract.DetermineNumKVBlocks())
        return parallel_state.min_over_ranks(self.local.determine_num_kv_blocks())

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.send(contract.AllocateKVCache(num_blocks))
        self.local.allocate_kv_cache(num_blocks)

    def capture_cuda_graphs(self) -> None:
        self.send(contract.CaptureCudaGraphs())
        self.local.capture_cuda_graphs()

    def execute(self, scheduler_output: contract.SchedulerOutput) -> PendingRunnerOutput | _LastStageOutput:
        with self._naming_dead_workers(), traced(self._trace, scheduler_output.step_id), PROGRESS.busy():
            self.send(contract.ExecuteStep(scheduler_output))
            output = self.local.execute(scheduler_output)
        return output if self._answering_rank == 0 else _LastStageOutput(self)

    def shutdown(self) -> None:
        """Stops the workers and leaves the process group (a later engine in this process can form its own)."""
        if self._finalizer.alive:
            try:
                self.send(contract.StopWorker())
                self._stopping.append(True)
                if self._trace is not None:
                    self._trace.write()
            except Exception:
                logger.warning("could not tell the parallel workers to stop; killing them")
            self._finalizer()

    def send(self, command: contract.WorkerCommand) -> None:
        self.check_workers()
        parallel_state.send_to_workers(_encoder.encode(command))

    def check_workers(self, grace_s: float = 0.0) -> None:
        """Raises WorkerDiedError if a worker has exited, or exits within `grace_s` seconds, or a rank on another
        node went silent."""
        deadline = time.monotonic() + grace_s
        while not (dead := [(rank, p.pid, p.returncode) for rank, p in zip(self._worker_ranks, self._workers)
                            if p.poll() is not None]):
            if self._lost_remote:
                raise WorkerDiedError("lost: " + ", ".join(self._lost_remote))
            if time.monotonic() >= deadline:
                return
            time.sleep(0.05)
        raise WorkerDiedError("worker(s) exited: " + ", ".join(
            f"rank {rank} (code {code}{self._why_killed(pid)})" for rank, pid, code in dead))

    def _why_killed(self, pid: int) -> str:
        if pid in self._watchdog.killed:
            return ", stopped: killed as hung"
        return f", {self._silenced[pid]}: killed as hung" if pid in self._silenced else ""

    def _rank_lost(self, rank: int, reason: str) -> None:
        """The heartbeat's verdict (its thread): a worker of this machine is killed, which fails whatever collective
        waits for it at once; a rank elsewhere cannot be, nor this one's stuck main thread."""
        if rank in self._worker_ranks:
            process = self._workers[self._worker_ranks.index(rank)]
            if process.poll() is None:
                self._silenced[process.pid] = reason
                process.kill()
            return
        self._lost_remote.append(f"rank {rank} on another node ({reason})" if rank else f"rank 0 ({reason})")
        if _report_before_exit is not None:
            logger.critical("rank %d is lost (%s): the engine process exits to be restarted", rank, reason)
            with contextlib.suppress(Exception):  # the report is a courtesy: the exit is what matters
                _report_before_exit(f"WorkerDiedError: lost: {self._lost_remote[-1]}")
            logging.shutdown()  # flushes the log before the exit that skips it
            os._exit(_LOST_RANK_EXIT_CODE)

    def receive_answer(self) -> contract.ModelRunnerOutput:
        """The last stage's output of the step."""
        with self._naming_dead_workers():
            return _output_decoder.decode(parallel_state.recv_bytes(self._answering_rank))

    @contextlib.contextmanager
    def _naming_dead_workers(self) -> Iterator[None]:
        """A step that fails on rank 0 ends the engine (WorkerDiedError) rather than only the step's requests, as
        it ends a worker: the other ranks went on with the step's collectives, so every later step's would pair
        with the wrong ones; and a collective that timed out (a rank that hung) leaves the group unusable. A peer
        that died mid-step shows as a communication error (connection reset), and is named."""
        try:
            yield
        except WorkerDiedError:
            raise
        except Exception as e:
            self.check_workers(grace_s=_EXIT_GRACE_S)
            lost = " (or a rank on another node is lost)" if self._remote else ""
            raise WorkerDiedError(f"a parallel step failed, the ranks are out of step{lost}: {type(e).__name__}: "
                                  f"{e}") from e


def _check_devices(config: EngineConfig, device: torch.device, local_ranks: int) -> None:
    """This machine's ranks take consecutive CUDA devices from rank 0's (`worker_device`); a missing one would fail
    its worker while the others wait at the rendezvous."""
    if device.type != "cuda":
        return
    first, available = device.index or 0, torch.cuda.device_count()
    if first + local_ranks > available:
        key = "tensor_parallel_size" if config.tensor_parallel_size > 1 else "pipeline_parallel_size"
        raise EngineConfigError(key, f"tensor {config.tensor_parallel_size} x pipeline "
                                     f"{config.pipeline_parallel_size} ranks need {local_ranks} GPUs on this machine "
                                     f"(cuda:{first} to cuda:{first + local_ranks - 1}), {available} visible")


class _LastStageOutput:
    """A step's output as the last pipeline stage will send it; `get()` waits for it."""

    def __init__(self, runner: TensorParallelRunner):
        self._runner = runner

    def get(self) -> contract.ModelRunnerOutput:
        return self._runner.receive_answer()


def _stop(workers: list[subprocess.Popen], stopping: list[bool], watchdog: StoppedRankWatchdog,
          heartbeats: list[Heartbeat]) -> None:
    """Waits for workers told to stop; kills those that were not (an engine dropped without `shutdown`)."""
    watchdog.stop()
    for heartbeat in heartbeats:
        heartbeat.stop()  # before the workers end: their silence is expected now
    for process in workers:
        try:
            process.wait(timeout=10 if stopping else 0)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    parallel_state.destroy()
