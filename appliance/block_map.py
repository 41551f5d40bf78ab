"""The dashboard's block map: a replica's KV block pool as at most `MAX_MAP_CELLS` characters, one a cell ('0' free,
'1' in use, '2' free but holding a reusable prefix), from the engine's per-block states or, without them, its counts.
"""

from __future__ import annotations

import math
from typing import Any

from engine.contract import SchedulerStats

MAX_MAP_CELLS = 2048  # the block map's resolution; larger pools fold several blocks into a cell
FREE, USED, CACHED = "0", "1", "2"  # block map cells, as `BlockPool.block_states()` numbers them
_STATE_CHARS = bytes.maketrans(b"\x00\x01\x02", b"012")


def block_map(stats: SchedulerStats) -> dict[str, Any]:
    num_blocks = stats.num_kv_blocks
    states = stats.block_states
    num_cells = min(num_blocks, MAX_MAP_CELLS)
    per_cell = max(1, math.ceil(num_blocks / max(num_cells, 1)))
    if states is not None and len(states) == num_blocks:
        states = bytes(states)
        if per_cell == 1:
            cells = states.translate(_STATE_CHARS).decode("ascii")
        else:  # each cell shows its blocks' most common state
            chunks = (states[i:i + per_cell] for i in range(0, num_blocks, per_cell))
            cells = "".join(_dominant(chunk) for chunk in chunks)
        return {"cells": cells, "blocks_per_cell": per_cell, "exact": True}
    num_cached = stats.num_cached_free_blocks
    num_used = num_blocks - stats.num_free_blocks
    num_free = num_blocks - num_used - num_cached
    used_cells, cached_cells = round(num_used / per_cell), round(num_cached / per_cell)
    if num_used and not used_cells:
        used_cells = 1  # a pool in use never shows as empty
    free_cells = max(0, math.ceil(num_blocks / per_cell) - used_cells - cached_cells)
    if num_free and not free_cells and used_cells + cached_cells > 1:
        free_cells = 1
    return {"cells": USED * used_cells + CACHED * cached_cells + FREE * free_cells, "blocks_per_cell": per_cell,
            "exact": False}


def _dominant(chunk: bytes) -> str:
    used, cached = chunk.count(1), chunk.count(2)
    free = len(chunk) - used - cached
    if used >= cached and used >= free:
        return USED
    return CACHED if cached >= free else FREE

