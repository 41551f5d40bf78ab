"""The process groups of one parallel engine, through torch.distributed (NCCL on CUDA, gloo on the CPU).

Rank 0 is the engine process itself; ranks 1.. are worker processes it starts. The world holds
pipeline_parallel_size stages of tensor_parallel_size ranks each, tensor-parallel ranks innermost (vLLM's layout):
rank = stage * tp_size + tp_rank. Groups:
- the world group (NCCL on CUDA, gloo on the CPU) carries the activations one stage sends to the next
  (point-to-point, rank r to rank r + tp_size).
- one tensor-parallel group per stage (the world itself without pipeline stages) carries the model's own
  collectives: the all-reduce after each row-parallel linear and the embedding, the all-gather of the logits.
- a gloo group on the CPU carries each `WorkerCommand` as msgpack bytes, sent from rank 0 to every other rank. Its
  wait has no practical limit: a worker waits for the next command as long as the engine idles.
- another gloo group on the CPU carries control: the last stage's results sent back to rank 0 (never pickled:
  torch's object collectives pickle, so they are not used), and small CPU reductions. Bytes are posted without
  waiting for the receiver (a gloo send waits until the other side receives), so rank 0 can launch step N+1 while
  a later stage still runs step N.
An expert-parallel group would be built beside the tensor-parallel ones, from the same layout.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import torch
import torch.distributed as dist

from engine.distributed import nodes

# The ranks wait this long for each other to arrive (the nodes of a multi-node engine start within it). A collective's
# own wait is the engine's `collective_timeout_s`: a dead or stopped rank fails it at once (its connections close, or
# the watchdog kills it), so that timeout is only for ranks hung otherwise, and must exceed the longest legitimate
# wait, a pipeline stage's for the steps of the stages before it.
RENDEZVOUS_TIMEOUT_S = 60.0
_IDLE_TIMEOUT = datetime.timedelta(days=365)
_JOINED_KEY = "kvbox/joined"  # the rendezvous store's count of ranks arrived
_JOIN_POLL_S = 0.1

_command_group: dist.ProcessGroup | None = None

_control_group: dist.ProcessGroup | None = None
_tp_group: dist.ProcessGroup | None = None  # None: the world
_threads_before: int | None = None  # this process's torch threads before its rank took its share of the CPU
_pending_sends: list[tuple[dist.Work, torch.Tensor]] = []  # control bytes posted, not sent yet, with their buffers


class RendezvousTimeout(TimeoutError):
    """Not every rank reached the rendezvous in time: on several machines, another node is not up (yet)."""


def free_tcp_address() -> str:
    """A tcp:// rendezvous address on this machine with a port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def stage_and_tp_rank(rank: int, tp_size: int) -> tuple[int, int]:
    return divmod(rank, tp_size)


def init_parallel(rank: int, tp_size: int, pp_size: int, init_method: str, device: torch.device, timeout_s: float,
                  check_peers: Callable[[], None] | None = None) -> None:
    """Joins this rank's engine; rank 0 calls `check_peers` while it waits for the others to arrive (it raises to
    give up, e.g. on a worker process that has exited)."""
    global _command_group, _control_group, _tp_group
    timeout = datetime.timedelta(seconds=timeout_s)
    backend = "nccl" if device.type == "cuda" else "gloo"
    nodes.pin_socket_interface(init_method)
    if backend == "gloo":
        _share_cpu_threads(tp_size * pp_size)
    store = _rendezvous(rank, tp_size * pp_size, init_method, RENDEZVOUS_TIMEOUT_S, check_peers)
    dist.init_process_group(backend, store=store, rank=rank, world_size=tp_size * pp_size, timeout=timeout,
                            device_id=device if device.type == "cuda" else None)
    _control_group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else dist.group.WORLD
    _command_group = dist.new_group(backend="gloo", timeout=_IDLE_TIMEOUT)
    if pp_size > 1:
        # Every rank creates every group, in the same order, and keeps its own.
        stage = stage_and_tp_rank(rank, tp_size)[0]
        for s in range(pp_size):
            group = dist.new_group(list(range(s * tp_size, (s + 1) * tp_size)), timeout=timeout)
            _tp_group = group if s == stage else _tp_group


def _rendezvous(rank: int, world_size: int, init_method: str, timeout_s: float,
                check_peers: Callable[[], None] | None) -> dist.TCPStore:
    """The ranks' meeting point: rank 0's TCP store, where each rank checks in. Rank 0 waits for them here rather
    than inside init_process_group, which cannot be interrupted: a worker that died before it arrived would have
    held the engine's start for the whole timeout."""
    address = urlsplit(init_method)
    store = dist.TCPStore(address.hostname, address.port, world_size, is_master=rank == 0,
                          timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)
    store.add(_JOINED_KEY, 1)
    deadline = time.monotonic() + timeout_s
    try:
        while rank == 0 and (joined := store.add(_JOINED_KEY, 0)) < world_size:
            if check_peers is not None:
                check_peers()
            if time.monotonic() > deadline:
                raise RendezvousTimeout(f"{joined - 1} of the {world_size - 1} other ranks reached the rendezvous at "
                                        f"{init_method} within {timeout_s:g} s")
            time.sleep(_JOIN_POLL_S)
    except BaseException:
        del store  # rank 0's store stops listening now, not when the traceback goes: a retry may take the port again
        raise
    return store


def answering_rank(tp_size: int, pp_size: int) -> int:
    """The rank whose step outputs are the engine's: the first of the last stage."""
    return (pp_size - 1) * tp_size


def _share_cpu_threads(world_size: int) -> None:
    """Ranks computing on the CPU split its cores, unless OMP_NUM_THREADS decides (the appliance sets it per engine
    process). Each rank with as many OpenMP threads as cores, their threads spin against each other's at every
    barrier: measured on 2 shared cores, two stages of a tiny model took 6 s for 8 decode steps, 0.6 s with one thread
    each."""
    global _threads_before
    if "OMP_NUM_THREADS" not in os.environ:
        _threads_before = torch.get_num_threads()
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // world_size))


def tp_group() -> dist.ProcessGroup | None:
    """The group of this rank's tensor-parallel collectives (None: the world)."""
    return _tp_group


def send_to_workers(payload: bytes) -> None:
    """Rank 0 posts a command to every other rank (each takes it with `receive_command`), in order."""
    for rank in range(1, dist.get_world_size()):
        send_bytes(payload, rank, _command_group)


def receive_command() -> bytes:
    return recv_bytes(0, _command_group)


def send_bytes(payload: bytes, dst: int, group: dist.ProcessGroup | None = None) -> None:
    """Posts `payload` to rank `dst` (on the control group unless told) and returns; messages to one rank arrive in
    the order posted. The buffers stay referenced until gloo has sent them."""
    global _pending_sends
    group = group or _control_group
    _pending_sends = [work for work in _pending_sends if not work[0].is_completed()]
    size = torch.tensor([len(payload)], dtype=torch.int64)
    data = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    _pending_sends += [(dist.isend(size, dst, group=group), size), (dist.isend(data, dst, group=group), data)]


def recv_bytes(src: int, group: dist.ProcessGroup | None = None) -> bytes:
    """What rank `src` sends with `send_bytes`. A sender that dies closes its connection, which fails the wait at
    once (gloo)."""
    size = torch.empty(1, dtype=torch.int64)
    dist.recv(size, src, group=group or _control_group)
    data = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.recv(data, src, group=group or _control_group)
    return data.numpy().tobytes()


def min_over_ranks(value: int) -> int:
    return _reduce(value, dist.ReduceOp.MIN)


def sum_over_ranks(value: int) -> int:
    return _reduce(value, dist.ReduceOp.SUM)


def _reduce(value: int, op: dist.ReduceOp) -> int:
    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=op, group=_control_group)
    return int(tensor.item())


def destroy() -> None:
    global _command_group, _control_group, _tp_group, _threads_before, _pending_sends
    _pending_sends = []
    if dist.is_initialized():
        dist.destroy_process_group()
    _command_group = _control_group = _tp_group = None
    if _threads_before is not None:
        torch.set_num_threads(_threads_before)
        _threads_before = None
