"""RMS norm and fused residual-add + RMS norm.

Each program normalizes BLOCK_ROWS rows held whole in registers (hidden up to 65536): one read and one write per
tensor. Sums of squares and scaling run in float32 and the result is cast once; the fused version first rounds
x + residual to the input dtype (that rounded sum is both the new residual and what gets normalized). The
references are `kernels.reference.rms_norm` and `kernels.reference.fused_add_rms_norm`.

The `_quant` forms feed a W8A8 linear with dynamic per-token activations: the row, rounded to the input dtype as
the plain norm would write it, is quantized in registers (its largest magnitude is at hand: the row is whole), so
the linear needs no quantizer launch of its own (3 us per linear at a decode step on an H200, bench/RESULTS.md).
Their reference is the plain op's followed by `kernels.reference.quantize_activations`, the composition the torch
backend runs in their place (`kernels._with_quantizing_producers`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.act_quant import quantize_in_registers, type_max

_MAX_HIDDEN = 65536


# Step sizes vary: one compiled variant for all of them (a variant compiled mid-run stalls the GPU).
@triton.jit(do_not_specialize=["num_tokens"])
def _rms_norm_kernel(
    x_ptr,  # [num_tokens, hidden]
    residual_ptr,  # [num_tokens, hidden] (FUSED_ADD only)
    weight_ptr,  # [hidden]
    out_ptr,  # [num_tokens, hidden] contiguous: the output, or with QUANT its 8-bit form
    scale_ptr,  # [num_tokens] float32 (QUANT only)
    new_residual_ptr,  # [num_tokens, hidden] contiguous (FUSED_ADD only)
    num_tokens,
    hidden,
    stride_x,
    stride_r,
    eps,
    weight_offset,
    BLOCK_ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    FUSED_ADD: tl.constexpr,
    QUANT: tl.constexpr,  # the output quantized per row (float8 e4m3 or int8, out_ptr's type)
    INT: tl.constexpr,  # QUANT into int8 (else float8 e4m3)
    TOP: tl.constexpr,  # the quantized type's largest value
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # [BLOCK_ROWS]
    cols = tl.arange(0, BLOCK)  # [BLOCK]
    col_mask = cols < hidden
    mask = (rows < num_tokens)[:, None] & col_mask[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if FUSED_ADD:
        r = tl.load(residual_ptr + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)  # the sum in the input dtype
        tl.store(new_residual_ptr + rows[:, None] * hidden + cols[None, :], x, mask=mask)
    x = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / hidden + eps)  # [BLOCK_ROWS]
    w = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32) + weight_offset
    out = x * rstd[:, None] * w[None, :]
    if QUANT:
        out = out.to(x_ptr.dtype.element_ty).to(tl.float32)  # what the plain norm would have written
        scale = tl.maximum(tl.max(tl.abs(out), 1) / TOP, 1e-12)  # [BLOCK_ROWS]; masked columns hold 0
        tl.store(scale_ptr + rows, scale, mask=rows < num_tokens)
        out = quantize_in_registers(out, scale[:, None], out_ptr, INT, TOP)
    tl.store(out_ptr + rows[:, None] * hidden + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def _as_rows(t: torch.Tensor, hidden: int, name: str) -> torch.Tensor:
    """[..., hidden] -> [num_tokens, hidden] with a unit column stride, copying only when a view is impossible."""
    if t.shape[-1] != hidden:
        raise ValueError(f"{name} has last dimension {t.shape[-1]}, expected hidden size {hidden}")
    rows = t if t.dim() == 2 else t.reshape(-1, hidden)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _launch(x, residual, weight, eps, weight_offset, quant_dtype=None):
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"weight must be [{hidden}], got {tuple(weight.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"unsupported dtype {x.dtype}; expected float16, bfloat16 or float32")
    if hidden > _MAX_HIDDEN:
        raise ValueError(f"hidden size {hidden} exceeds the kernel's limit of {_MAX_HIDDEN}")
    if not weight.is_contiguous():
        weight = weight.contiguous()
    x2 = _as_rows(x, hidden, "x")
    r2 = _as_rows(residual, hidden, "residual") if residual is not None else x2
    if residual is not None and r2.shape != x2.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} differs from x's {tuple(x.shape)}")
    num_tokens = x2.shape[0]
    out = torch.empty(x2.shape, dtype=quant_dtype or x.dtype, device=x.device)
    scale = torch.empty(num_tokens, 1, dtype=torch.float32, device=x.device) if quant_dtype else out
    new_residual = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else out
    if num_tokens:
        block = triton.next_power_of_2(hidden)
        block_rows = max(1, min(16, 2048 // block))  # small hidden (per-head q/k norm): several rows a program
        num_warps = min(16, max(1, block * block_rows // 512))
        _rms_norm_kernel[(triton.cdiv(num_tokens, block_rows),)](
            x2, r2, weight, out, scale, new_residual, num_tokens, hidden, x2.stride(0), r2.stride(0), float(eps),
            float(weight_offset), BLOCK_ROWS=block_rows, BLOCK=block, FUSED_ADD=residual is not None,
            QUANT=quant_dtype is not None, INT=quant_dtype == torch.int8, TOP=type_max(quant_dtype),
            num_warps=num_warps,
        )
    if quant_dtype is not None:
        return out, scale, new_residual
    return out.view(x.shape), new_residual


def rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    weight_offset: float = 0.0,  # Gemma scales by (1 + weight)
) -> torch.Tensor:
    return _launch(x, None, weight, eps, weight_offset)[0]


def fused_add_rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]
    residual: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    weight_offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual) as new tensors; x and residual are left unchanged."""
    return _launch(x, residual, weight, eps, weight_offset)


def rms_norm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [num_tokens, hidden] in `dtype`, float32 scale [num_tokens, 1]): rms_norm's rows quantized per token."""
    return _launch(x, None, weight, eps, weight_offset, dtype)[:2]


def fused_add_rms_norm_quant(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                             weight_offset: float, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """(q, scale, x + residual)."""
    return _launch(x, residual, weight, eps, weight_offset, dtype)
