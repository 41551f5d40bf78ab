"""Weight-only integer linears on CUDA (W4A16 / W8A16): y = x @ dequant(W).T (+ bias) on the canonical GPTQ layout of
`engine.quantization.wna16` (int32 words packing input rows low bits first, per-group scales and zeros, g_idx).

Four paths, chosen by the number of rows without measuring (thresholds `GEMV_MAX_ROWS`, `MMA_MAX_ROWS`,
`FUSED_MAX_ROWS`):
- one row with contiguous groups (batch-1 decode): a GEMV on the CUDA cores that never converts an integer to a float.
  The 8th session's profile showed the fused kernel below bound by instructions, not bytes: per weight a shift, a mask,
  an int -> float conversion (a quarter-rate instruction), the zero, the scale and a round trip through x's dtype. Here
  a value becomes a float by OR-ing its bits into the mantissa of a float whose last step is 1 at their position: the
  word is rotated (a byte permutation, shared by two 4-bit fields) to bring the field to bit 16 or 12 (4 bits) or 8 (8
  bits), and one LOP3 (mask, OR the offset's exponent; written in PTX, as ptxas keeps two instructions for it) makes
  exactly O + q, O = 128, 2048 or 2^15, which the loop multiplies into its float32 sum as it is: the offsets and the
  zero point leave the loop (s * (sum x (O + q) - sum x (O + z)) per step, one group; a larger O would cost the sum's
  precision, a smaller one a rotation per field), and the scale is applied once per step. Every thread lies along N
  (four columns, one 16-byte load a row) and holds all of a step's word rows, so the sum over them stays in its
  registers and x's values of a row, the same for every thread, are loaded in place: Triton loads a tensor with fewer
  elements than threads in the layout that broadcasts it, where the GEMV before (a tile's rows spread over threads,
  [GROUPS x GROUP_WORDS] of x per field, as many as the threads) moved each field's x through shared memory, a barrier
  each (gate/up for sm_90: 1296 SASS instructions for 256 weights a thread, 5.1 a weight; now 550 in the loop's body for
  128, 4.3; H100 in a graph, RESULTS twenty-fifth session: gate/up 33.9 -> 30.1 us, down 18.6 -> 15.1, qkv 8.6 -> 8.0, o
  7.0 -> 6.3). It skips the reference's rounding of the dequantized weight to x's dtype (it sums the exact values in
  float32, closer to the float32 dequantization transformers runs). Its loads feed no tl.dot, which the kernel's
  num_stages does not pipeline, so the loop fetches the next steps into registers itself, or (DEPTH 0: gate/up on an
  H200) has `tl.range` pipeline them through shared memory. K is split so that enough programs read the layer, and the
  last slice of a tile to finish (an atomic ticket) sums the float32 partials in slice order: results do not vary run to
  run and no second kernel runs.
- 2 to 16 rows of 4-bit contiguous groups of 128 or more (decode batches), bf16 / fp16: the tensor-core kernel.
  The weight is the MMA's A operand [BLOCK_N, 16 words], loaded (pipelined, 16-byte copies) in its packed layout;
  one PTX LOP3 turns two 4-bit values into two floats (each ORed into the mantissa of 128.0 in bf16 or 1024.0 in
  fp16, where the last exponent step is 1: exactly offset + value), eight per pair of words, in the registers the
  MMA reads. The j-th value of each word meets x's input rows 8 * word + j: x's step tile is loaded once and split
  by position in registers, so each MMA has a K of 16 words. Each step is one group: the zero point and offset
  leave the sum (s (sum x (offset + q) - (offset + z) sum x)) and the scale applies once per output, like the
  GEMV's exact sums. K is split into slices of whole steps that finish as the GEMV's do. On an H100
  (`bench/quant_kernels.py --rows 4,16`, RESULTS.md, twenty-first session) it took qkv from 19.6-20.6 us (the fused
  kernel) to 11.9-14.3, gate/up from 65-67 to 39-40, down from 35-37 to 22-25; batch-4 and batch-16 decode of
  Llama-3.1-8B GPTQ +37% and +29%. At one row the GEMV stays ahead (qkv 10.4 against 11.9 us); at 256 rows it is
  far behind dequantize + cuBLAS (each step's eight MMAs of K 16 then a wait: the tensor cores idle).
- up to 64 rows (small batches, other formats, act-order at one row): one fused kernel. Each program takes BLOCK_N
  output columns and BLOCK_M rows over a slice of K, unpacks a [BLOCK_K, BLOCK_N] tile of the packed weight in
  registers, applies its group's scale and zero and feeds the tensor cores (or, for a few rows, multiplies and sums in
  registers, which pads nothing); the weight is read once, at 4 bits. When g_idx is plain `row // group_size`
  (no act-order) one scale row serves a whole K tile; with act-order each row gathers its own group. K is split
  when the layer has too few column tiles: each slice writes a float32 partial and one sum finishes them (in a
  fixed order, so results do not vary run to run).
- more rows (large decode batches, prefill): the layer is dequantized once into a scratch [K, N] buffer of x's
  dtype and cuBLAS runs the GEMM. `bench/quant_kernels.py` on an H200 (Llama-3.1-8B's qkv, bench/RESULTS.md,
  nineteenth session): the fused kernel 28.7 / 46.7 / 80.3 us at 64 / 128 / 256 rows, dequantize + cuBLAS 34.8 /
  38.0 / 42.5: from about 100 rows the extra pass over the weight costs less than the fused kernel's tiles (not for
  every shape: gate/up at 128 rows 162 against 199 us); offline 200 x 1024/128 went from 23.84 to 27.55 req/s.
The reference is `kernels.reference.wna16_linear` (dequantize in float32, cast to x's dtype, F.linear), which the
fused kernel matches: it rounds the dequantized weight to x's dtype before the dot, as the reference does.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from engine.kernels.split_k import check_tiles, finish_split, ticket_counters

FUSED_MAX_ROWS = 64
GEMV_MAX_ROWS = 1
MMA_MAX_ROWS = 16
_MMA_STEP_WORDS = 16  # a step: 128 input rows, one MMA of 16 per position in the word
_TARGET_PROGRAMS = 1024
_DECODE_BLOCK_N, _DECODE_BLOCK_K = 128, 256  # the best of bench/quant_kernels.py --sweep on an H200
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _dequantized_tile(qw_ptr, scales_ptr, zeros_ptr, g_idx_ptr, k0, kk, cols, k_mask, col_mask, N, K,
                      BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """The float32 weight tile [BLOCK_K, BLOCK_N] of input rows `kk` (from `k0`, a multiple of the words' row count)
    and output columns `cols`. Each packed word is loaded once and shifted into its rows (loading it per row would
    issue one load per row it holds)."""
    PACK: tl.constexpr = 32 // BITS
    words = k0 // PACK + tl.arange(0, BLOCK_K // PACK)
    word_mask = (words < (K + PACK - 1) // PACK)[:, None] & col_mask[None, :]
    packed = tl.load(qw_ptr + words[:, None].to(tl.int64) * N + cols[None, :], mask=word_mask, other=0)
    shifts = tl.arange(0, PACK) * BITS
    q = tl.reshape((packed[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1), (BLOCK_K, BLOCK_N))
    if GROUP_SIZE > 0:  # the tile lies in one group (the launcher makes BLOCK_K divide the group size)
        group = k0 // GROUP_SIZE
        scale = tl.load(scales_ptr + group * N + cols, mask=col_mask, other=0.0)[None, :]
        zero = tl.load(zeros_ptr + group * N + cols, mask=col_mask, other=0)[None, :]
    else:
        mask = k_mask[:, None] & col_mask[None, :]
        group = tl.load(g_idx_ptr + kk, mask=k_mask, other=0)[:, None].to(tl.int64)
        scale = tl.load(scales_ptr + group * N + cols[None, :], mask=mask, other=0.0)
        zero = tl.load(zeros_ptr + group * N + cols[None, :], mask=mask, other=0)
    return (q.to(tl.float32) - zero.to(tl.float32)) * scale.to(tl.float32)


# Step sizes vary: one compiled variant for all of them (a variant compiled mid-run stalls the GPU).
@triton.jit(do_not_specialize=["M"])
def _wna16_fused_kernel(
    x_ptr, qw_ptr, scales_ptr, zeros_ptr, g_idx_ptr, bias_ptr, out_ptr,
    M, N, stride_x,
    K: tl.constexpr, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,  # GROUP_SIZE 0: read g_idx
    K_SPLIT: tl.constexpr,  # the K slice of a program (program_id(2))
    PARTIAL: tl.constexpr,  # K is split: out_ptr holds a float32 partial per slice
    HAS_BIAS: tl.constexpr, F32_DOT: tl.constexpr,  # bf16 dots are wrong in the interpreter
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(2)
    ks = tl.arange(0, BLOCK_K)
    col_mask, row_mask = cols < N, rows < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    start = split * K_SPLIT
    for step in range(0, K_SPLIT, BLOCK_K):
        k = start + step
        kk = k + ks
        k_mask = kk < K
        w = _dequantized_tile(qw_ptr, scales_ptr, zeros_ptr, g_idx_ptr, k, kk, cols, k_mask, col_mask, N, K, BITS,
                              GROUP_SIZE, BLOCK_K, BLOCK_N)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + kk[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if BLOCK_M < 16:  # tensor-core tiles are 16 rows: below that multiply and sum in registers
            acc += tl.sum(x.to(tl.float32)[:, :, None] * w.to(x.dtype).to(tl.float32)[None, :, :], axis=1)
        elif F32_DOT:
            acc = tl.dot(x.to(tl.float32), w.to(x.dtype).to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)
    out_ptrs = out_ptr + rows[:, None].to(tl.int64) * N + cols[None, :]
    out_mask = row_mask[:, None] & col_mask[None, :]
    if PARTIAL:
        tl.store(out_ptrs + split.to(tl.int64) * M * N, acc, mask=out_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _wna16_dequantize_kernel(qw_ptr, scales_ptr, zeros_ptr, g_idx_ptr, out_ptr, N, K,
                             BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr,
                             BLOCK_N: tl.constexpr):
    k0 = tl.program_id(0) * BLOCK_K
    kk = k0 + tl.arange(0, BLOCK_K)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_mask, col_mask = kk < K, cols < N
    w = _dequantized_tile(qw_ptr, scales_ptr, zeros_ptr, g_idx_ptr, k0, kk, cols, k_mask, col_mask, N, K, BITS,
                          GROUP_SIZE, BLOCK_K, BLOCK_N)
    tl.store(out_ptr + kk[:, None].to(tl.int64) * N + cols[None, :], w.to(out_ptr.dtype.element_ty),
             mask=k_mask[:, None] & col_mask[None, :])




@triton.jit
def _wna16_gemv_kernel(
    x_ptr, qw_ptr, scales_ptr, zeros_ptr, bias_ptr, partial_ptr, ticket_ptr, out_ptr, N,
    K: tl.constexpr, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,  # contiguous groups: word w is in w * PACK // G
    SPLITS: tl.constexpr, K_SPLIT: tl.constexpr,  # K_SPLIT: the input rows of one slice (program_id(1))
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
    STEP: tl.constexpr,  # word rows a step, inside one group
    DEPTH: tl.constexpr,  # steps fetched ahead into registers: 1 or 2; 0: Triton's pipeliner, 3 stages in shared memory
    EMULATE: tl.constexpr,  # the interpreter runs no PTX: a mask and an OR in Triton make the same floats
    EVEN_K: tl.constexpr,  # every slice is whole steps inside K: x's loads need no mask
):
    PACK: tl.constexpr = 32 // BITS
    tile = tl.program_id(0)
    split = tl.program_id(1)
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    first = split * (K_SPLIT // PACK)
    end = tl.minimum(first + K_SPLIT // PACK, K // PACK)
    # The kernel's num_stages pipelines only loads that feed a tl.dot: at DEPTH 1 or 2 the loop keeps that many steps
    # (and their group's scale and zero) in flight in registers while it sums the current one.
    if DEPTH > 0:
        packed, scale, zero = _gemv_step(qw_ptr, scales_ptr, zeros_ptr, first, end, cols, col_mask, N, STEP, PACK,
                                         GROUP_SIZE)
    if DEPTH == 2:
        packed_2, scale_2, zero_2 = _gemv_step(qw_ptr, scales_ptr, zeros_ptr, first + STEP, end, cols, col_mask, N,
                                               STEP, PACK, GROUP_SIZE)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # ptxas issues a register prefetch only after the last use of the registers it reuses, so at DEPTH 1 a step's
    # load waits out most of its latency at the next step; DEPTH 2 keeps one more step in flight, and Triton's own
    # pipeline (DEPTH 0: asynchronous copies, `num_stages` 3) none of that, at the cost of a pass through shared memory
    for step in tl.range(0, K_SPLIT // (STEP * PACK), num_stages=3 if DEPTH == 0 else 1):
        rows = first + step * STEP + tl.arange(0, STEP)  # fewer than the threads: x's loads below are made in the
        # layout that broadcasts them (each thread loads the values of its rows), not moved through shared memory
        if DEPTH == 0:
            packed, scale, zero = _gemv_step(qw_ptr, scales_ptr, zeros_ptr, first + step * STEP, end, cols, col_mask,
                                             N, STEP, PACK, GROUP_SIZE)
        else:
            ahead = _gemv_step(qw_ptr, scales_ptr, zeros_ptr, first + (step + DEPTH) * STEP, end, cols, col_mask, N,
                               STEP, PACK, GROUP_SIZE)
        # sum_k x_k (q_k - z) s = s (sum_k x_k (O_k + q_k) - sum_k x_k (O_k + z)) over the step (one group): the
        # offsets and the zero leave the loop; O_k takes two values (4 bits: 128 for even fields, 2048 for odd)
        part = tl.zeros((STEP, BLOCK_N), dtype=tl.float32)
        x_even = tl.zeros((STEP,), dtype=tl.float32)
        x_odd = tl.zeros((STEP,), dtype=tl.float32)
        if not EMULATE:  # one LOP3 a value: ptxas keeps a mask and an OR of two constants as two
            fields = tl.inline_asm_elementwise(_FIELDS_4 if BITS == 4 else _FIELDS_8,
                                               _FIELDS_4_OUT if BITS == 4 else _FIELDS_8_OUT, [packed],
                                               dtype=(tl.int32,) * PACK, is_pure=True, pack=1)
        for j in tl.static_range(PACK):
            WINDOW = _window(BITS, j)
            if EMULATE:
                if BITS * j >= WINDOW:
                    moved = packed >> (BITS * j - WINDOW)
                else:
                    moved = packed << (WINDOW - BITS * j)
                offset_plus_field = (moved & (((1 << BITS) - 1) << WINDOW)) | _magic(BITS, j)
            else:
                offset_plus_field = fields[j]
            value = offset_plus_field.to(tl.float32, bitcast=True)  # exactly 2^(23 - WINDOW) + q
            kk = rows * PACK + j
            if EVEN_K:
                xs = tl.load(x_ptr + kk).to(tl.float32)
            else:
                xs = tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
            if _window(BITS, j) == _window(BITS, 0):
                x_even += xs
            else:
                x_odd += xs
            part += xs[:, None] * value
        # the step's rows lie in each thread: the sums over them are in registers
        if BITS == 8:  # one offset, 2^15: taken off row by row, or the float32 sum over the step would lose bits
            part -= (zero.to(tl.float32)[None, :] + (1 << (23 - _window(BITS, 0)))) * x_even[:, None]
            acc += tl.sum(part, axis=0) * scale.to(tl.float32)
        else:
            even = tl.sum(x_even, axis=0)
            odd = tl.sum(x_odd, axis=0)
            offsets = even * (1 << (23 - _window(BITS, 0))) + odd * (1 << (23 - _window(BITS, 1)))
            acc += (tl.sum(part, axis=0) - zero.to(tl.float32) * (even + odd) - offsets) * scale.to(tl.float32)
        if DEPTH == 2:
            packed, scale, zero = packed_2, scale_2, zero_2
            packed_2, scale_2, zero_2 = ahead
        elif DEPTH == 1:
            packed, scale, zero = ahead
    finish_split(acc, cols, col_mask, cols, col_mask, bias_ptr, partial_ptr, ticket_ptr, out_ptr, tile, split, N,
                 SPLITS, HAS_BIAS)


@triton.jit
def _gemv_step(qw_ptr, scales_ptr, zeros_ptr, w0, end, cols, col_mask, N, STEP: tl.constexpr, PACK: tl.constexpr,
               GROUP_SIZE: tl.constexpr):
    """The step's packed words from word row `w0`, [STEP, cols] (masked past `end`), and its group's scale and zero
    point [cols]."""
    rows = w0 + tl.arange(0, STEP)
    group = (w0 * PACK // GROUP_SIZE).to(tl.int64) * N + cols
    group_mask = (w0 < end) & col_mask
    return (tl.load(qw_ptr + rows[:, None].to(tl.int64) * N + cols[None, :],
                    mask=(rows < end)[:, None] & col_mask[None, :], other=0),
            tl.load(scales_ptr + group, mask=group_mask, other=0.0),
            tl.load(zeros_ptr + group, mask=group_mask, other=0))


def _nibbles_asm(magic: int) -> str:
    """PTX: two int32 words of 4-bit values (a, b) -> eight registers of two 16-bit floats, the j-th holding
    (magic + a's j-th value, magic + b's j-th value). One LOP3 makes two floats: the value ORed into the mantissa of
    `magic`'s float (bf16 128.0, fp16 1024.0), whose last exponent step is 1, is exactly magic + value."""
    lines = ["{", ".reg .b32 lo, hi, t;", "prmt.b32 lo, $8, $9, 0x5410;", "prmt.b32 hi, $8, $9, 0x7632;"]
    for j in range(8):
        half = "lo" if j < 4 else "hi"
        if j % 4:
            lines.append(f"shr.u32 t, {half}, {4 * (j % 4)};")
        lines.append(f"lop3.b32 ${j}, {'t' if j % 4 else half}, 0x000f000f, {magic:#010x}, 0xea;")
    return "\n".join(lines + ["}"])


@triton.constexpr_function
def _window(bits, j):
    """The mantissa bit where the GEMV places a word's j-th `bits`-bit field: in the float whose last step there is 1
    (2^(23 - window)), OR-ing the field in gives exactly 2^(23 - window) + q. 4 bits: 16 and 12 (offsets 128 and
    2048), so one rotation of the word serves two fields; 8 bits: 8 (offset 2^15). A larger offset would cost the
    float32 sums precision (they cancel it later), a smaller one needs a rotation per field."""
    return 8 if bits == 8 else 16 - 4 * (j % 2)


@triton.constexpr_function
def _magic(bits, j):
    """The bits of the float 2^(23 - _window(bits, j))."""
    return (127 + 23 - _window(bits, j)) << 23


def _fields_asm(bits: int) -> tuple[str, str]:
    """PTX and its constraints: an int32 word of `bits`-bit values -> 32 // bits registers, the j-th holding the
    float 2^(23 - w) + q_j, w = _window(bits, j): the word rotated (a byte permutation) to bring field j to bit w,
    then one LOP3 (mask, OR the offset's bits). Fields that need the same rotation share it."""
    pack = 32 // bits
    word = f"${pack}"
    lines = ["{", ".reg .b32 r8, r16, r24;"]
    rotations = sorted({(w - bits * j) % 32 for j in range(pack) for w in [_window(bits, j)]} - {0})
    selectors = {8: 0x2103, 16: 0x1032, 24: 0x0321}  # rotate left by 1, 2, 3 bytes
    lines += [f"prmt.b32 r{r}, {word}, {word}, {selectors[r]:#06x};" for r in rotations]
    for j in range(pack):
        window = _window(bits, j)
        rotation = (window - bits * j) % 32
        source = f"r{rotation}" if rotation else word
        mask = ((1 << bits) - 1) << window
        lines.append(f"lop3.b32 ${j}, {source}, {mask:#x}, {_magic(bits, j):#x}, 0xea;")
    return "\n".join(lines + ["}"]), ",".join(["=r"] * pack + ["r"])


_FIELDS_4, _FIELDS_4_OUT = (tl.constexpr(text) for text in _fields_asm(4))
_FIELDS_8, _FIELDS_8_OUT = (tl.constexpr(text) for text in _fields_asm(8))
_NIBBLES_BF16 = tl.constexpr(_nibbles_asm(0x43004300))  # bf16 128.0 twice
_NIBBLES_FP16 = tl.constexpr(_nibbles_asm(0x64006400))  # fp16 1024.0 twice


# Step sizes vary: one compiled variant for all of them (a variant compiled mid-run stalls the GPU).
@triton.jit(do_not_specialize=["M"])
def _wna16_mma_kernel(
    x_ptr, qw_ptr, scales_ptr, zeros_ptr, bias_ptr, partial_ptr, ticket_ptr, out_ptr, M, N, stride_x,
    K: tl.constexpr, GROUP_SIZE: tl.constexpr,  # 4-bit values, contiguous groups of whole steps
    SPLITS: tl.constexpr, K_SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
    EMULATE: tl.constexpr,  # the interpreter runs no PTX: shifts and float32 dots compute the same sums
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, STEP_WORDS: tl.constexpr,
):
    OFFSET: tl.constexpr = 0.0 if EMULATE else 128.0 if x_ptr.dtype.element_ty == tl.bfloat16 else 1024.0
    # Row tiles first: the programs that read one weight tile run together, and the later ones find it in L2.
    row_tile, col_tile, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    col_mask, row_mask = cols < N, rows < M
    words = tl.arange(0, STEP_WORDS)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # the output transposed: the weight is the MMA's A
    first = split * (K_SPLIT // 8)
    # whole steps in every slice (the launcher splits K so), so no load along K needs a mask (a masked x row would
    # be loaded an element at a time)
    for step in range(0, K_SPLIT // (STEP_WORDS * 8)):
        w0 = first + step * STEP_WORDS
        packed = tl.load(qw_ptr + (w0 + words)[None, :].to(tl.int64) * N + cols[:, None], mask=col_mask[:, None],
                         other=0)  # [BLOCK_N, STEP_WORDS]
        group = w0 * 8 // GROUP_SIZE  # a step lies in one group
        scale = tl.load(scales_ptr + group * N + cols, mask=col_mask, other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + group * N + cols, mask=col_mask, other=0).to(tl.float32)
        if not EMULATE:
            values = tl.inline_asm_elementwise(
                _NIBBLES_BF16 if x_ptr.dtype.element_ty == tl.bfloat16 else _NIBBLES_FP16,
                "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [packed], dtype=(x_ptr.dtype.element_ty,) * 8, is_pure=True, pack=2)
        # the step's x [BLOCK_M, STEP_WORDS * 8] in one load, split by position in the word: input rows
        # k = 8 * word + j meet the j-th value of each word
        ks = w0 * 8 + tl.arange(0, STEP_WORDS * 8)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + ks[None, :], mask=row_mask[:, None], other=0.0)
        x_sum = tl.sum(x.to(tl.float32), axis=1)
        xs = _by_position(x, BLOCK_M, STEP_WORDS)
        # sum_k x_k (q_k - z) s = s (sum_k x_k (OFFSET + q_k) - (OFFSET + z) sum_k x_k) over the step's group: the
        # MMA takes the converted values as they are, the zero and scale apply once per output
        part = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for j in tl.static_range(8):
            if EMULATE:
                q = ((packed >> (4 * j)) & 15).to(tl.float32)
                part = tl.dot(q, xs[j].to(tl.float32), part, input_precision="ieee")
            else:
                part = tl.dot(values[j], xs[j], part)
        acc += (part - (zero + OFFSET)[:, None] * x_sum[None, :]) * scale[:, None]
    finish_split(acc, rows[None, :].to(tl.int64) * N + cols[:, None], row_mask[None, :] & col_mask[:, None],
                  cols[:, None], col_mask[:, None], bias_ptr, partial_ptr, ticket_ptr, out_ptr,
                  col_tile * tl.num_programs(0) + row_tile, split, M * N, SPLITS, HAS_BIAS)


@triton.jit
def _by_position(x, BLOCK_M: tl.constexpr, STEP_WORDS: tl.constexpr):
    """x [BLOCK_M, STEP_WORDS * 8] -> 8 tensors [STEP_WORDS, BLOCK_M], the j-th holding columns 8 * w + j: halves
    by the lowest bit of j, then the next two (register moves, no memory)."""
    even, odd = tl.split(tl.reshape(x, (BLOCK_M, STEP_WORDS, 4, 2)))
    j04, j26 = tl.split(tl.reshape(even, (BLOCK_M, STEP_WORDS, 2, 2)))
    j15, j37 = tl.split(tl.reshape(odd, (BLOCK_M, STEP_WORDS, 2, 2)))
    j0, j4 = tl.split(j04)
    j2, j6 = tl.split(j26)
    j1, j5 = tl.split(j15)
    j3, j7 = tl.split(j37)
    return (tl.trans(j0), tl.trans(j1), tl.trans(j2), tl.trans(j3), tl.trans(j4), tl.trans(j5), tl.trans(j6),
            tl.trans(j7))


def _gemv_config(k: int, n: int, device: torch.device | None = None) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, STEP word rows, K splits, warps, DEPTH steps fetched ahead) for the GEMV: the best of 81 launches
    per projection of Llama-3.1-8B on an H100 (a part of `bench/quant_kernels.py --rows 1 --sweep gemv`'s grid;
    bench/RESULTS.md, twenty-fifth session; the runners-up within 2%). With BLOCK_N = 128 x warps each thread takes
    four columns; twice that, two such strips. The split count is an upper bound: a slice holds whole steps."""
    if n >= 16384:  # gate/up: Triton's pipeline won on an H200 (29.7 -> 27.5 us; batch-1 decode +2.2%, o's launch
        # pipelined too) and lost on an H100 (batch-1 -0.7%)
        return (256, 8, 8, 1, 0) if _h200(device) else (128, 4, 8, 1, 2)
    if k >= 8192:  # down
        return 256, 16, 32, 2, 1
    return 512, 16, 32, 4, 2  # qkv, o


@functools.cache
def _h200(device: torch.device | None) -> bool:
    return device is not None and device.type == "cuda" and "H200" in torch.cuda.get_device_name(device)


def wna16_gemv(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
               group_size: int, bias: torch.Tensor | None, config: tuple[int, ...] | None = None) -> torch.Tensor:
    """One row x2 [1, K] -> [1, N] for contiguous groups (`group_size` > 0 or -1); see the module's notes."""
    m, k = x2.shape
    n = qweight.shape[1]
    pack = 32 // bits
    group = k if group_size == -1 else group_size
    block_n, step, splits, warps, depth = config or _gemv_config(k, n, x2.device)
    step = min(step, group // pack)
    step &= -step  # a power of two dividing the group: no step straddles two groups
    k_split = triton.cdiv(triton.cdiv(k, splits), step * pack) * step * pack
    splits = triton.cdiv(k, k_split)
    tiles = triton.cdiv(n, block_n)
    check_tiles(tiles, splits)
    out = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    partial = torch.empty(splits, n, dtype=torch.float32, device=x2.device) if splits > 1 else out
    _wna16_gemv_kernel[(tiles, splits)](
        x2, qweight, scales, zeros, bias if bias is not None else scales, partial,
        ticket_counters(x2.device) if splits > 1 else scales, out, n, K=k, BITS=bits, GROUP_SIZE=group,
        SPLITS=splits, K_SPLIT=k_split, HAS_BIAS=bias is not None, BLOCK_N=block_n, STEP=step, DEPTH=depth,
        EMULATE=_INTERPRET, EVEN_K=k % k_split == 0, num_warps=warps, num_stages=2)
    return out


def mma_applies(bits: int, group_size: int, k: int, dtype: torch.dtype, step_words: int = _MMA_STEP_WORDS) -> bool:
    """Whether the tensor-core kernel runs this layer: 4 bits, bf16 / fp16 x, contiguous groups of whole steps
    (`step_words` words: 128 input rows by default; not act-order)."""
    group = k if group_size == -1 else group_size
    return (bits == 4 and group_size != 0 and dtype in (torch.bfloat16, torch.float16)
            and group % (step_words * 8) == 0 and k % (step_words * 8) == 0)


def _mma_config(m: int, k: int, n: int) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_N, BLOCK_M, STEP_WORDS, K splits, warps, stages) for the tensor-core kernel: K split in up to 8
    slices until about 512 programs read the weight; the best of `bench/quant_kernels.py --sweep mma` at 1, 4 and 16
    rows on an H100 for Llama-3.1-8B's projections (qkv, o, down 8 slices, gate/up 2; 128 columns, 3 stages)."""
    block_n, block_m = 128, min(64, max(16, triton.next_power_of_2(m)))
    tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    splits = 1
    while splits < 8 and tiles * splits * 2 <= 512 and k // (splits * 2) >= 256:
        splits *= 2
    return block_n, block_m, _MMA_STEP_WORDS, splits, 4, 3


def wna16_mma(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
              bias: torch.Tensor | None, config: tuple[int, ...] | None = None) -> torch.Tensor:
    """x2 [M, K] -> [M, N] on the tensor cores, 4-bit weights converted in registers, for layers `mma_applies` to
    (float32 x only under the interpreter); see the module's notes."""
    m, k = x2.shape
    n = qweight.shape[1]
    block_n, block_m, step_words, splits, warps, stages = config or _mma_config(m, k, n)
    steps = k // (step_words * 8)
    splits = max(d for d in range(1, min(splits, steps) + 1) if steps % d == 0)  # slices of whole steps
    tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    check_tiles(tiles, splits)
    out = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    partial = torch.empty(splits, m, n, dtype=torch.float32, device=x2.device) if splits > 1 else out
    _wna16_mma_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n), splits)](
        x2, qweight, scales, zeros, bias if bias is not None else scales, partial,
        ticket_counters(x2.device) if splits > 1 else scales, out, m, n, x2.stride(0), K=k,
        GROUP_SIZE=k if group_size == -1 else group_size, SPLITS=splits, K_SPLIT=k // splits,
        HAS_BIAS=bias is not None, EMULATE=_INTERPRET, BLOCK_N=block_n, BLOCK_M=block_m, STEP_WORDS=step_words,
        num_warps=warps, num_stages=stages)
    return out


def _block_k(k: int, group_size: int, widest: int) -> tuple[int, int]:
    """(BLOCK_K, GROUP_SIZE for the kernel): a K tile inside one group when the groups are contiguous, else 0 and
    a free tile (each row reads its own group)."""
    block = min(widest, triton.next_power_of_2(k))
    if group_size > 0:
        group = k if group_size == -1 else group_size
        if group % block:
            block = min(block, group & -group)  # the largest power of two dividing the group
        if block >= 16:
            return block, group
    return max(16, block), 0


def wna16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 g_idx: torch.Tensor, bits: int, bias: torch.Tensor | None = None, group_size: int = 0, *,
                 fused_max_rows: int = FUSED_MAX_ROWS, config: tuple[int, ...] | None = None,
                 gemv_config: tuple[int, ...] | None = None, mma_config: tuple[int, ...] | None = None
                 ) -> torch.Tensor:
    """[..., K] -> [..., N] in x's dtype. `group_size`: a promise that g_idx is `row // group_size` (-1: one group
    over K), which lets the kernel read one scale row per tile; 0: g_idx is read per row (act-order).
    `fused_max_rows`, the fused kernel's `config` (see `_fused_config`; given, it forces the fused kernel), the
    GEMV's `gemv_config` (see `_gemv_config`) and the tensor-core kernel's `mma_config` (see `_mma_config`; given,
    it forces that kernel) are overridable for tests and tuning."""
    k, n = x.shape[-1], qweight.shape[1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if mma_config is not None or (GEMV_MAX_ROWS < m <= MMA_MAX_ROWS and config is None
                                  and mma_applies(bits, group_size, k, x.dtype)):
        step_words = _MMA_STEP_WORDS if mma_config is None else mma_config[2]
        # float32 x runs under the interpreter only (its tests' dtype); groups must hold whole steps everywhere
        if not mma_applies(bits, group_size, k, torch.bfloat16 if _INTERPRET else x.dtype, step_words):
            raise ValueError(f"the tensor-core kernel does not take {bits}-bit groups of {group_size} at K={k} "
                             f"for {x.dtype}")
        return wna16_mma(x2, qweight, scales, zeros, group_size, bias, mma_config).view(*x.shape[:-1], n)
    if m > fused_max_rows and config is None:
        weight = dequantize_wna16_t(qweight, scales, zeros, g_idx, bits, x.dtype, group_size)
        out = x2 @ weight if bias is None else torch.addmm(bias.to(x.dtype), x2, weight)
        return out.view(*x.shape[:-1], n)
    if m == 0:
        return x2.new_empty(*x.shape[:-1], n)
    if m <= GEMV_MAX_ROWS and group_size != 0 and config is None:
        return wna16_gemv(x2, qweight, scales, zeros, bits, group_size, bias, gemv_config).view(*x.shape[:-1], n)
    block_m, block_n, block_k, splits, warps, stages = config or _fused_config(m, k, n)
    block_k, group = _block_k(k, group_size, block_k)
    k_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k  # whole tiles: a tile stays in one group
    splits = triton.cdiv(k, k_split)
    out = torch.empty((splits, m, n) if splits > 1 else (m, n), dtype=torch.float32 if splits > 1 else x.dtype,
                      device=x.device)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), splits)
    _wna16_fused_kernel[grid](
        x2, qweight, scales, zeros, g_idx, bias if bias is not None else scales, out, m, n, x2.stride(0),
        K=k, BITS=bits, GROUP_SIZE=group, K_SPLIT=k_split, PARTIAL=splits > 1, HAS_BIAS=bias is not None,
        F32_DOT=_INTERPRET or x.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=warps, num_stages=stages)
    if splits > 1:
        out = out.sum(0) if bias is None else out.sum(0).add_(bias)
        out = out.to(x.dtype)
    return out.view(*x.shape[:-1], n)


def _fused_config(m: int, k: int, n: int) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, K splits, warps, stages) for the fused kernel. K is split until about
    `_TARGET_PROGRAMS` programs read the weight: a decode GEMV of Llama-3.1-8B's o_proj has only 128 column tiles
    for 132 SMs, each SM wanting several tiles in flight."""
    if m <= 16:
        block_m, block_n, block_k, warps, stages = (1 if m == 1 else 16), _DECODE_BLOCK_N, _DECODE_BLOCK_K, 4, 3
    else:
        block_m, block_n, block_k, warps, stages = 64, 64, 128, 4, 3
    tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    splits = 1
    while tiles * splits * 2 <= _TARGET_PROGRAMS and k // (splits * 2) >= 2 * block_k:
        splits *= 2
    return block_m, block_n, block_k, splits, warps, stages


def dequantize_wna16_t(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
                       bits: int, dtype: torch.dtype, group_size: int = 0) -> torch.Tensor:
    """The layer's weight transposed, [K, N] in `dtype` (the reference's `dequantize_wna16(...).T`, rounded)."""
    k, n = g_idx.shape[0], qweight.shape[1]
    out = torch.empty(k, n, dtype=dtype, device=qweight.device)
    block_k, group = _block_k(k, group_size, 64)
    _wna16_dequantize_kernel[(triton.cdiv(k, block_k), triton.cdiv(n, 64))](
        qweight, scales, zeros, g_idx, out, n, k, BITS=bits, GROUP_SIZE=group, BLOCK_K=block_k, BLOCK_N=64)
    return out
