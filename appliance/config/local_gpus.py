"""Whether a model's ranks on this machine fit its CUDA devices, checked at config check (`kvbox check-config`, the
server's start) with the rule the engine applies when it starts (`engine.distributed.tp_runner._check_devices`): a
replica's ranks on this node take consecutive devices from its first (`cuda:N`, else cuda:0), so they need that
many visible. Data-parallel replicas share the devices when there are too few for distinct slices
(`appliance.node.replica_env`), so only one replica's ranks count. Without torch: the driver's GPUs (`nvidia-smi
-L`) within CUDA_VISIBLE_DEVICES; a machine that shows none (a laptop planning a config, the CPU) is not checked.
"""

from __future__ import annotations

import functools
import os
import subprocess
from collections.abc import Callable
from typing import NoReturn

from appliance.config.schema import ModelSpec
from engine.distributed.nodes import node_ranks


def check_local_gpus(m: ModelSpec, fail: Callable[[str, str], NoReturn], nodes: tuple[int, int] | None) -> None:
    """`nodes`: (nnodes, node_rank); None: as `kvbox serve` defaults them, from the environment."""
    nnodes, node_rank = nodes or _nodes_from_env()
    p = m.parallelism
    if m.gpu_ids is not None or m.device == "cpu" or (visible := visible_gpu_count()) == 0:
        return  # gpu_ids: checked against parallelism; the CPU: ranks share its cores
    ranks = node_ranks(p.tensor * p.pipeline, nnodes, node_rank)
    first = int(m.device.partition(":")[2] or 0)
    if p.tensor * p.pipeline == 1 or first + len(ranks) <= visible:
        return
    key = "parallelism.tensor" if p.tensor > 1 else "parallelism.pipeline"
    where = "this machine" if nnodes == 1 else (f"node {node_rank} of {nnodes} (ranks {ranks.start} to "
                                                f"{ranks.stop - 1})")
    fail(key, f"tensor {p.tensor} x pipeline {p.pipeline} ranks need {len(ranks)} GPUs on {where} (cuda:{first} to "
              f"cuda:{first + len(ranks) - 1}), {visible} visible")


def _nodes_from_env() -> tuple[int, int]:
    try:
        return int(os.environ.get("KVBOX_NNODES", "1")), int(os.environ.get("KVBOX_NODE_RANK", "0"))
    except ValueError:
        return 1, 0  # kvbox serve refuses them, naming the variable


def visible_gpu_count() -> int:
    count = _driver_gpu_count()
    if (names := os.environ.get("CUDA_VISIBLE_DEVICES")) is not None:
        # CUDA stops at the first id that is not a device (-1 hides them all).
        listed = [name.strip() for name in names.split(",")]
        valid = next((i for i, name in enumerate(listed) if not name or name.startswith("-")), len(listed))
        count = min(count, valid)
    return count


@functools.cache
def _driver_gpu_count() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in out.splitlines())
