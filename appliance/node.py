"""Multi-node serving: the node layout (`kvbox serve --nnodes N --node-rank R --master-addr HOST --master-port P`)
and what a node other than 0 runs; on every node, the environment of a model replica's processes (`replica_env`:
its GPUs, its CPU threads).

Node 0 runs the API, the supervisor and every model's engine process (rank 0) with its local ranks. Node R > 0 runs
no API: for each model replica with ranks on it (`engine.distributed.nodes.node_ranks`), it keeps those ranks' worker
processes running. A worker waits at its replica's rendezvous for rank 0 and ends with it (a failed collective,
StopWorker, rank 0's heartbeat stopping (`engine.distributed.heartbeat`), or the rendezvous timing out while node 0
is away; a rank found stopped is killed, see `engine.distributed.watchdog`); the node then starts the ranks afresh,
so they rejoin whenever node 0's engine (re)starts. Every node reads the same config file, and the model's files must
be at the same path on every node.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from appliance.config import AppConfig, ModelSpec
from engine.config import EngineConfig
from engine.distributed.nodes import node_ranks, rendezvous_address
from engine.distributed.watchdog import StoppedRankWatchdog

logger = logging.getLogger("kvbox.node")
# After its ranks end, a node waits this long before they rejoin: node 0's engine sees the loss first and restarts,
# rather than a new rank reaching the old engine's rendezvous.
REJOIN_DELAY_S = 2.0
_STOP_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class NodeLayout:
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    def rendezvous_port(self, config: AppConfig, name: str, replica: int) -> int:
        """master_port + the replica's slot: models in config order, each data-parallel replica a slot."""
        slot = 0
        for spec in config.models:
            if spec.name == name:
                return self.master_port + slot + replica
            slot += spec.parallelism.data
        raise KeyError(name)

    def local_ranks(self, spec: ModelSpec) -> range:
        """The ranks of each replica of the model that run on this node."""
        return node_ranks(spec.parallelism.tensor * spec.parallelism.pipeline, self.nnodes, self.node_rank)

    def engine_config(self, config: AppConfig, name: str, replica: int, engine: EngineConfig) -> EngineConfig:
        if self.nnodes == 1:
            return engine
        return dataclasses.replace(engine, nnodes=self.nnodes, master_addr=self.master_addr,
                                   master_port=self.rendezvous_port(config, name, replica))


class _RankGroup:
    """One model replica's ranks on this node, restarted together whenever one of them ends."""

    def __init__(self, config: AppConfig, layout: NodeLayout, spec: ModelSpec, replica: int, ranks: range):
        from engine.distributed.worker import worker_device  # it imports torch: node 0's API server starts without

        self.label = f"{spec.name}[{replica}] ranks {ranks.start}..{ranks.stop - 1}"
        p = spec.parallelism
        address = rendezvous_address(layout.master_addr, layout.rendezvous_port(config, spec.name, replica))
        self.commands = [[sys.executable, "-m", "engine.distributed.worker", str(rank), str(p.tensor), str(p.pipeline),
                          address, worker_device(spec.device, local), str(config.server.engine_hang_timeout_s),
                          str(config.server.rank_heartbeat_timeout_s)]
                         for local, rank in enumerate(ranks)]
        self.env = replica_env(spec, replica, config, len(ranks))
        self.processes: list[subprocess.Popen] = []
        self.ended_at = -REJOIN_DELAY_S

    def keep_alive(self) -> None:
        if self.processes and all(p.poll() is None for p in self.processes):
            return
        if self.processes:
            codes = [p.returncode for p in self.processes]
            self.stop()
            self.ended_at = time.monotonic()
            logger.info("%s ended (exit codes %s); rejoining in %.0f s", self.label, codes, REJOIN_DELAY_S)
        if time.monotonic() - self.ended_at >= REJOIN_DELAY_S:
            self.processes = [subprocess.Popen(c, env={**os.environ, **self.env}) for c in self.commands]
            logger.info("%s: waiting for rank 0 at %s", self.label, self.commands[0][6])

    def stop(self) -> None:
        for p in self.processes:
            if p.poll() is None:
                p.terminate()
        for p in self.processes:
            try:
                p.wait(_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.processes = []


def serve_node(config: AppConfig, layout: NodeLayout) -> int:
    """Node R > 0 until SIGTERM or SIGINT: keeps its ranks of every model running. Exit code 0."""
    groups = []
    for spec in config.models:
        if ranks := layout.local_ranks(spec):
            groups += [_RankGroup(config, layout, spec, replica, ranks) for replica in range(spec.parallelism.data)]
    logger.info("node %d of %d: %s", layout.node_rank, layout.nnodes,
                ", ".join(g.label for g in groups) or "no model has ranks here")
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    # A frozen rank here would hold node 0's engine until its collective timeout; killed, it rejoins fresh.
    watchdog = StoppedRankWatchdog(lambda: [p for group in groups for p in group.processes],
                                   f"node {layout.node_rank}")
    while not stopping.wait(0.2):
        for group in groups:
            group.keep_alive()
    watchdog.stop()
    for group in groups:
        group.stop()
    logger.info("node %d stopped", layout.node_rank)
    return 0


def replica_env(spec: ModelSpec, replica: int, config: AppConfig, ranks_here: int | None = None) -> dict[str, str]:
    """Pins each data-parallel replica to its own GPUs: the config's gpu_ids, else consecutive slices of the visible
    devices, `ranks_here` each (the replica's ranks on this machine; default: all its ranks). Shares the CPU's cores
    among engines that compute on the CPU (torch's threads in several processes would otherwise contend)."""
    env = {}
    p = spec.parallelism
    if spec.gpu_ids:
        per_replica = len(spec.gpu_ids) // p.data
        ids = spec.gpu_ids[replica * per_replica:(replica + 1) * per_replica]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, ids))
    elif p.data > 1 and (spec.device == "cuda" or (spec.device == "auto" and _has_cuda())):
        # Unpinned, every replica would take the same first devices. With fewer devices than ranks the replicas
        # still share them (small replicas on one card), as the engine allows.
        per_replica = p.tensor * p.pipeline if ranks_here is None else ranks_here
        if len(visible := _visible_gpus()) >= p.data * per_replica:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(visible[replica * per_replica:(replica + 1) * per_replica])
    if spec.device == "cpu" or (spec.device == "auto" and not spec.gpu_ids and not _has_cuda()):
        env.update(_cpu_threads_env(config))
    elif "OMP_WAIT_POLICY" not in os.environ:
        # A GPU engine's host ops are small (a grammar bitmask's pinned copy, a few numpy-sized tensors), but each
        # wakes torch's OpenMP pool, whose workers then spin: served JSON-schema decoding on the H200's 16 cores
        # burnt 283 CPU-s in a 28 s run (15 spinning workers), which the API server and its clients needed.
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


def _cpu_threads_env(config: AppConfig) -> dict[str, str]:
    """OpenMP settings for an engine computing on the CPU; the operator's own OMP_* variables win.

    OpenMP's workers spin at every barrier by default (OMP_WAIT_POLICY=active): when the cores are shared with the
    supervisor, other engines or anything else, a worker waits for a descheduled sibling while burning its core,
    every one of a step's few dozen parallel regions. Measured on 2 busy cores (bench/serve.py, tiny llama, 8
    streams of 200 tokens): a decode step took ~100 ms instead of ~3 ms, and 40 KV blocks made that 78 s; passive
    workers sleep at barriers instead: 2.1 s.
    """
    # Each tensor-parallel rank of each pipeline stage is a process of its own.
    num_engines = sum(m.parallelism.num_gpus for m in config.models)
    env = {"OMP_NUM_THREADS": str(max(1, len(os.sched_getaffinity(0)) // num_engines)), "OMP_WAIT_POLICY": "PASSIVE"}
    return {key: value for key, value in env.items() if key not in os.environ}


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _visible_gpus() -> list[str]:
    """This process's CUDA devices, as CUDA_VISIBLE_DEVICES names them (ids or UUIDs)."""
    if (names := os.environ.get("CUDA_VISIBLE_DEVICES")) is not None:
        return [name.strip() for name in names.split(",") if name.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]
