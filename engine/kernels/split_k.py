"""Split-K for the decode-sized weight-only linears (`kernels.wna16`'s GEMV and tensor-core kernel): a layer with
few output tiles splits its K into slices so that enough programs read it; each slice writes a float32 partial and the
last slice of a tile to finish (an atomic ticket) sums them in slice order, so results do not vary run to run and no
second kernel runs."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_TILES = 1 << 16
_tickets: dict[torch.device, torch.Tensor] = {}


def ticket_counters(device: torch.device) -> torch.Tensor:
    """Per-device zeroed int32 counters, one per output tile; each finished tile resets its own, so one buffer serves
    every launch on the device's stream (they run one after another)."""
    if device not in _tickets:
        _tickets[device] = torch.zeros(MAX_TILES, dtype=torch.int32, device=device)
    return _tickets[device]


def check_tiles(tiles: int, splits: int) -> None:
    if splits > 1 and tiles > MAX_TILES:
        raise ValueError(f"{tiles} output tiles exceed the {MAX_TILES} split-K tickets")


@triton.jit
def finish_split(result, offsets, mask, cols, col_mask, bias_ptr, partial_ptr, ticket_ptr, out_ptr, tile, split,
                 slice_size, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Stores a program's float32 `result` at `offsets` of the output (bias added; `cols` broadcast against it);
    with SPLITS > 1 through the partials (`slice_size` apart) and the tile's ticket."""
    if SPLITS > 1:
        tl.store(partial_ptr + split.to(tl.int64) * slice_size + offsets, result, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the ticket is taken
        if tl.atomic_add(ticket_ptr + tile, 1, sem="acq_rel") == SPLITS - 1:  # the tile's last slice to finish
            total = tl.zeros_like(result)
            for s in tl.static_range(SPLITS):  # slice order: the same sum whichever slice finished last
                total += tl.load(partial_ptr + s * slice_size + offsets, mask=mask, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(ticket_ptr + tile, 0)  # ready for the next launch (and CUDA graph replay)
            _store_result(total, offsets, mask, cols, col_mask, bias_ptr, out_ptr, HAS_BIAS)
    else:
        _store_result(result, offsets, mask, cols, col_mask, bias_ptr, out_ptr, HAS_BIAS)


@triton.jit
def _store_result(result, offsets, mask, cols, col_mask, bias_ptr, out_ptr, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        result += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, result.to(out_ptr.dtype.element_ty), mask=mask)
