"""The host swap pool's bookkeeping: which host blocks hold which swapped-out request's K/V, and the moves queued for
the next step (the paper's swapping, instead of recomputing a preempted request).

A preempted request whose blocks are all its own moves them to free host blocks (`swap_out`: device -> host pairs);
it keeps its computed tokens and waits in the queue. When it is admitted again it gets fresh device blocks, and
`swap_in` queues host -> device pairs for the first of them and frees its host blocks. The runner applies a step's
moves before its forward (`engine.kv_memory.KVMemory.move_blocks`). This module knows nothing of tensors; the host
tensors live in `engine.kv_memory`.
"""

from __future__ import annotations

from engine.contract import SwapStats


class HostSwap:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # popped from the end: block 0 first
        self._held: dict[str, list[int]] = {}  # request id -> its host blocks, in block-table order
        self.pending_out: list[tuple[int, int]] = []  # (device, host) block ids, for the next step
        self.pending_in: list[tuple[int, int]] = []  # (host, device)
        self.num_swapped_out = 0  # cumulative, in blocks
        self.num_swapped_in = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def holds(self, request_id: str) -> bool:
        return request_id in self._held

    def swap_out(self, request_id: str, device_blocks: list[int]) -> None:
        """Queues the moves of these device blocks to free host blocks (the caller checked that enough are free)."""
        host_blocks = [self._free.pop() for _ in device_blocks]
        self._held[request_id] = host_blocks
        self.pending_out.extend(zip(device_blocks, host_blocks))
        self.num_swapped_out += len(device_blocks)

    def swap_in(self, request_id: str, device_blocks: list[int]) -> None:
        """Queues the moves of the request's host blocks into the first of `device_blocks`, and frees them."""
        host_blocks = self._held.pop(request_id)
        self.pending_in.extend(zip(host_blocks, device_blocks))
        self.num_swapped_in += len(host_blocks)
        self._free.extend(reversed(host_blocks))

    def drop(self, request_id: str) -> None:
        """Frees a swapped-out request's host blocks (it ended while swapped out)."""
        self._free.extend(reversed(self._held.pop(request_id, [])))

    def take_moves(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """The (swap-out, swap-in) pairs queued since the last call, for the step being scheduled."""
        moves = self.pending_out, self.pending_in
        self.pending_out, self.pending_in = [], []
        return moves

    def stats(self) -> SwapStats:
        return SwapStats(num_host_blocks=self.num_blocks, num_used_host_blocks=self.num_blocks - len(self._free),
                         num_swapped_requests=len(self._held), num_swapped_out_blocks=self.num_swapped_out,
                         num_swapped_in_blocks=self.num_swapped_in)
