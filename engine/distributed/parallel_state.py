"""The process groups of one tensor-parallel engine, through torch.distributed (NCCL on CUDA, gloo on the CPU).

Rank 0 is the engine process itself; ranks 1.. are worker processes it starts. Two groups:
- the world group (NCCL on CUDA, gloo on the CPU) carries the model's own collectives: the all-reduce after each
  row-parallel linear and the embedding, the all-gather of the logits. The model layers call torch.distributed on
  the default group, which is this one.
- a gloo group on the CPU carries control: each step's `WorkerCommand` as msgpack bytes, broadcast from rank 0 (never
  pickled: torch's object collectives pickle, so they are not used), and small CPU reductions.
"""

from __future__ import annotations

import datetime
import socket

import torch
import torch.distributed as dist

# A collective waits this long for a rank before failing, so that a dead or hung worker fails the engine (which its
# supervisor restarts) instead of hanging it.
COLLECTIVE_TIMEOUT_S = 60.0

_control_group: dist.ProcessGroup | None = None


def free_tcp_address() -> str:
    """A tcp:// rendezvous address on this machine with a port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def init_tensor_parallel(rank: int, world_size: int, init_method: str, device: torch.device,
                         timeout_s: float = COLLECTIVE_TIMEOUT_S) -> None:
    global _control_group
    timeout = datetime.timedelta(seconds=timeout_s)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size, timeout=timeout,
                            device_id=device if device.type == "cuda" else None)
    _control_group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD


def broadcast_bytes(payload: bytes | None) -> bytes:
    """Rank 0 sends `payload`; every other rank passes None and gets it."""
    is_source = dist.get_rank() == 0
    size = torch.tensor([len(payload) if is_source else 0], dtype=torch.int64)
    dist.broadcast(size, src=0, group=_control_group)
    data = (torch.frombuffer(bytearray(payload), dtype=torch.uint8) if is_source
            else torch.empty(int(size.item()), dtype=torch.uint8))
    dist.broadcast(data, src=0, group=_control_group)
    return payload if is_source else data.numpy().tobytes()


def min_over_ranks(value: int) -> int:
    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=_control_group)
    return int(tensor.item())


def destroy() -> None:
    global _control_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _control_group = None
