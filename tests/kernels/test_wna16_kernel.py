"""The weight-only integer linear (kernels/wna16.py) against `kernels.reference.wna16_linear` on random canonical
layouts: 4 and 8 bits, contiguous groups, one group over K and act-order g_idx, with and without bias, on both paths
(the fused kernel for small batches, dequantize + cuBLAS above `fused_max_rows`).

Without CUDA a few tiny cases run under the Triton interpreter (see conftest.py); Llama-3.1-8B's projections at
decode and prefill sizes are marked `gpu`.
"""

import collections
import pytest
import torch
from sm90_compile import record_only
from test_kernels import DEVICE, dtype_id, gpu

from engine.quantization.wna16 import default_g_idx, pack_rows
from engine.kernels import reference, split_k, wna16

# (atol, rtol) for outputs of about unit size: the dequantized weight is rounded to x's dtype as the reference does;
# only the order of the float32 sums differs.
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def make_layer(k, n, bits, group_size, act_order, seed):
    """Canonical tensors (qweight, scales, zeros, g_idx) and the `contiguous_group_size` hint the method passes."""
    g = torch.Generator().manual_seed(seed)
    groups = 1 if group_size == -1 else k // group_size
    values = torch.randint(0, 1 << bits, (k, n), generator=g)
    zeros = torch.randint(0, 1 << bits, (groups, n), generator=g, dtype=torch.int16)
    spread = (1 << bits) / 3.5  # about the std of q - zero
    scales = (torch.rand(groups, n, generator=g) + 0.5) / (spread * k**0.5)
    g_idx = default_g_idx(k, group_size, torch.device("cpu"))
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=g)]
    tensors = (pack_rows(values, bits), scales.half(), zeros, g_idx)
    return [t.to(DEVICE) for t in tensors], 0 if act_order else group_size


def check(m, k, n, bits, group_size, act_order, dtype, bias, **options):
    (qweight, scales, zeros, g_idx), hint = make_layer(k, n, bits, group_size, act_order, seed=m * k + n)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    b = torch.randn(n, generator=g).to(DEVICE, dtype) if bias else None
    out = wna16.wna16_linear(x, qweight, scales, zeros, g_idx, bits, b, hint, **options)
    expected = reference.wna16_linear(x.float(), qweight, scales, zeros, g_idx, bits,
                                      None if b is None else b.float())
    if dtype != torch.float32:  # the reference rounds the weight to x's dtype: do the same before the float32 sum
        weight = reference.dequantize_wna16(qweight, scales, zeros, g_idx, bits).to(dtype).float()
        expected = torch.nn.functional.linear(x.float(), weight, None if b is None else b.float())
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out, expected.to(dtype), atol=atol, rtol=rtol)


@pytest.mark.parametrize(("m", "k", "n", "bits", "group_size", "act_order", "dtype", "bias"), [
    (1, 64, 48, 4, 32, False, torch.float32, False),  # decode: one scale row per tile
    (5, 128, 40, 8, -1, False, torch.float16, True),  # 8 bits, one group over K, masked columns
    (3, 64, 32, 4, 32, True, torch.bfloat16, False),  # act-order: each row gathers its group
    (20, 64, 32, 4, 32, False, torch.float32, False),  # more rows than one tile of 16
], ids=lambda v: dtype_id(v) if isinstance(v, torch.dtype) else None)
def test_fused_kernel_matches_reference(m, k, n, bits, group_size, act_order, dtype, bias):
    check(m, k, n, bits, group_size, act_order, dtype, bias)


@pytest.mark.parametrize(("m", "bits", "group_size", "act_order", "bias", "config"), [
    (1, 4, 32, False, False, (1, 32, 32, 4, 4, 2)),  # decode GEMV in registers, K split in four
    (2, 8, -1, False, True, (1, 32, 32, 2, 4, 2)),  # one program row per token, bias added after the sum
    (3, 4, 32, True, True, (16, 32, 32, 3, 4, 2)),  # act-order on tensor cores, three slices
])
def test_split_k_and_register_paths_match_reference(m, bits, group_size, act_order, bias, config):
    """(BLOCK_M, BLOCK_N, BLOCK_K, K splits, warps, stages) forced: the float32 partials of each K slice, summed,
    equal the unsplit result."""
    check(m, 128, 48, bits, group_size, act_order, torch.float32, bias, config=config)


@pytest.mark.parametrize("act_order", [False, True])
def test_dequantize_then_gemm_path_matches_reference(act_order):
    check(6, 64, 48, 4, 32, act_order, torch.float32, True, fused_max_rows=4)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("m", [1, 3, 7, 16, 100, 256, 1024])
@pytest.mark.parametrize(("k", "n"), [(4096, 6144), (4096, 28672), (14336, 4096)])
def test_llama_8b_projections(m, k, n, dtype):
    check(m, k, n, 4, 128, False, dtype, False)


@gpu
@pytest.mark.parametrize(("bits", "group_size", "act_order"), [(4, -1, False), (8, 128, False), (4, 128, True),
                                                                (4, 32, False)])
@pytest.mark.parametrize("m", [1, 64, 600])
def test_other_formats_on_the_gpu(m, bits, group_size, act_order):
    check(m, 2048, 1024, bits, group_size, act_order, torch.bfloat16, True)


@pytest.mark.parametrize(("bits", "group_size", "dtype", "bias", "gemv_config"), [
    (4, 32, torch.float32, False, None),  # the default launch
    (8, -1, torch.float16, True, None),  # 8 bits: two values per half word
    (4, 64, torch.bfloat16, True, (16, 4, 4, 4, 1)),  # K in four slices: the last one sums the partials
    (8, 32, torch.float32, False, (32, 2, 8, 4, 2)),  # eight slices of one tile each, 8-bit groups of 32
    (4, 128, torch.float32, False, (16, 4, 1, 4, 1)),  # one slice of eight tiles, each fetched one ahead
    (8, 64, torch.float32, False, (16, 4, 1, 4, 2)),  # ... and two ahead
    (4, 32, torch.float32, True, (16, 16, 1, 4, 2)),  # steps of 16 words cut to the group's 4
    (4, 64, torch.bfloat16, False, (32, 4, 2, 1, 0)),  # Triton's pipeline over the steps, two slices
], ids=lambda v: dtype_id(v) if isinstance(v, torch.dtype) else None)
def test_gemv_matches_reference(bits, group_size, dtype, bias, gemv_config):
    """One row with contiguous groups: the conversion-free GEMV (it sums exact dequantized values in float32; the
    tolerance of x's dtype covers the reference's rounding of the weight to it)."""
    check(1, 256, 48, bits, group_size, False, dtype, bias, gemv_config=gemv_config)


@pytest.mark.parametrize("depth", [2, 0])
def test_gemv_slices_past_the_end_of_k_mask_their_steps(depth):
    """K = 320 in three slices of 128 inputs: the last slice's steps past K read nothing of x (NaN lies there; the x
    loads are masked only when slices overrun K: `EVEN_K`), with the register prefetch and with Triton's pipeline."""
    (qweight, scales, zeros, g_idx), _ = make_layer(320, 48, 4, 32, False, seed=5)
    padded = torch.full((1, 448), float("nan"))
    padded[:, :320] = torch.randn(1, 320, generator=torch.Generator().manual_seed(5))
    x = padded.to(DEVICE)[:, :320]
    out = wna16.wna16_gemv(x, qweight, scales, zeros, 4, 32, None, (16, 4, 3, 4, depth))
    expected = x @ reference.dequantize_wna16(qweight, scales, zeros, g_idx, 4).T
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_gemv_split_k_is_deterministic_and_resets_its_tickets():
    """The split-K ticket: the last slice of each tile sums the partials in slice order (two calls, same bits) and
    puts the tile's counter back to zero, so that the next launch, or a CUDA graph's replay, starts clean."""
    (qweight, scales, zeros, g_idx), _ = make_layer(256, 96, 4, 32, False, seed=3)
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    config = (16, 4, 8, 4, 2)
    first = wna16.wna16_gemv(x, qweight, scales, zeros, 4, 32, None, config)
    assert not split_k.ticket_counters(x.device).any()
    second = wna16.wna16_gemv(x, qweight, scales, zeros, 4, 32, None, config)
    assert torch.equal(first, second)
    expected = x @ reference.dequantize_wna16(qweight, scales, zeros, g_idx, 4).T
    torch.testing.assert_close(first, expected, atol=1e-4, rtol=1e-4)


def test_a_given_config_runs_the_fused_kernel_above_its_row_threshold(monkeypatch):
    """Tuning (bench/quant_kernels.py --sweep fused) times the fused kernel at any row count: a `config` forces it
    past `fused_max_rows`, where the dequantize + GEMM path would otherwise run."""
    def no_dequantize(*args, **kwargs):
        raise AssertionError("the dequantize + GEMM path ran")

    monkeypatch.setattr(wna16, "dequantize_wna16_t", no_dequantize)
    check(6, 64, 48, 4, 32, False, torch.float32, True, fused_max_rows=4, config=(16, 32, 32, 1, 4, 2))


@pytest.mark.parametrize(("m", "group_size", "bias", "mma_config"), [
    (1, 128, False, (16, 16, 16, 1, 4, 2)),  # one row padded to a 16-row tile, one group per step
    (3, -1, True, (32, 16, 16, 2, 4, 2)),  # one group over K, two slices: the last sums the partials
    (20, 128, False, (16, 16, 16, 1, 4, 2)),  # two row tiles
    (5, 256, True, (16, 16, 32, 4, 4, 2)),  # steps of 32 words, one a group; four slices asked, one step each
])
def test_tensor_core_kernel_matches_reference(m, group_size, bias, mma_config):
    """The tensor-core kernel: each position in the packed words meets its rows of x in one MMA, and the zero point
    and scale apply once per step and output (it sums exact values, like the GEMV). The GPU runs it in bf16 only
    (float32 x takes the other paths)."""
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    check(m, 256, 48, 4, group_size, False, dtype, bias, mma_config=mma_config)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the GPU runs these launches in test_tensor_core_kernel_on_the_gpu")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_tensor_core_kernel_ptx_conversion_is_recorded_for_sm90(monkeypatch, dtype):
    """The interpreter cannot run PTX: the launches as a GPU makes them (the PTX conversion, bf16 / fp16 dots) are
    recorded, not run, for test_zz_sm90_compile to compile; the PTX's bits are checked below, its values on the
    GPU."""
    (qweight, scales, zeros, _), _ = make_layer(4096, 6144, 4, 128, False, seed=0)
    monkeypatch.setattr(wna16, "_INTERPRET", False)
    with record_only():
        for m in (2, 16):
            x = torch.zeros(m, 4096, dtype=dtype)
            wna16.wna16_mma(x, qweight, scales, zeros, 128, None)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the GPU runs the GEMV's PTX in its own tests")
@pytest.mark.parametrize("bits", [4, 8])
def test_gemv_ptx_is_recorded_for_sm90(monkeypatch, bits):
    """The GEMV as a GPU launches it (one LOP3 a value, in PTX) is recorded for test_zz_sm90_compile; its bits are
    checked below."""
    (qweight, scales, zeros, _), _ = make_layer(4096, 6144, bits, 128, False, seed=0)
    monkeypatch.setattr(wna16, "_INTERPRET", False)
    with record_only():
        wna16.wna16_gemv(torch.zeros(1, 4096, dtype=torch.bfloat16), qweight, scales, zeros, bits, 128, None)


def _run_ptx(asm: str, a: int, b: int = 0) -> list[int]:
    """A conversion's PTX run on its input words (the registers after its outputs): a few-line interpreter of the
    three instructions they use."""
    def prmt(x, y, selector):
        pool = [(x >> (8 * i)) & 255 for i in range(4)] + [(y >> (8 * i)) & 255 for i in range(4)]
        return sum(pool[(selector >> (4 * i)) & 7] << (8 * i) for i in range(4))

    def lop3(x, y, z, table):  # bit i of the result: table's bit at index (x_i << 2 | y_i << 1 | z_i)
        return sum(((table >> (((x >> i) & 1) << 2 | ((y >> i) & 1) << 1 | ((z >> i) & 1))) & 1) << i
                   for i in range(32))

    outputs = asm.count("lop3.b32 $")
    regs = {f"${outputs}": a, f"${outputs + 1}": b}
    for line in asm.splitlines():
        op, _, operands = line.strip().rstrip(";").partition(" ")
        args = [v.strip() for v in operands.split(",")]
        value = lambda v: regs[v] if v in regs else int(v, 0)  # noqa: E731
        if op == "prmt.b32":
            regs[args[0]] = prmt(value(args[1]), value(args[2]), value(args[3]))
        elif op == "shr.u32":
            regs[args[0]] = value(args[1]) >> value(args[2])
        elif op == "lop3.b32":
            regs[args[0]] = lop3(value(args[1]), value(args[2]), value(args[3]), value(args[4]))
        else:
            assert op in ("{", "}", ".reg"), f"an instruction the check does not model: {line}"
    return [regs[f"${j}"] for j in range(outputs)]


@pytest.mark.parametrize("bits", [4, 8])
def test_gemv_ptx_gives_each_field_plus_its_windows_offset(bits):
    """Register j holds the float 2^(23 - w) + q_j, w = _window(bits, j), for the j-th field q_j of random words (the
    GEMV sums it against x's element and subtracts x's sum times the offset once per group); the offsets are the
    ones the PTX is written for (128 and 2048 for 4 bits, 2^15 for 8)."""
    asm = wna16._fields_asm(bits)[0]
    pack = 32 // bits
    offsets = [2.0 ** (23 - wna16._window(bits, j)) for j in range(pack)]
    assert set(offsets) == ({128.0, 2048.0} if bits == 4 else {32768.0})
    g = torch.Generator().manual_seed(bits)
    for word in torch.randint(0, 2**32, (64,), generator=g, dtype=torch.int64).tolist():
        values = torch.tensor(_run_ptx(asm, word), dtype=torch.int64).to(torch.int32).view(torch.float32)
        fields = [offsets[j] + ((word >> (bits * j)) & ((1 << bits) - 1)) for j in range(pack)]
        assert torch.equal(values.double(), torch.tensor(fields, dtype=torch.float64))


@pytest.mark.parametrize(("asm", "dtype", "offset"), [(wna16._NIBBLES_BF16.value, torch.bfloat16, 128),
                                                      (wna16._NIBBLES_FP16.value, torch.float16, 1024)],
                         ids=["bf16", "fp16"])
def test_ptx_conversion_gives_offset_plus_each_value(asm, dtype, offset):
    """Register j of the conversion holds (offset + a's j-th 4-bit value, offset + b's) as two floats, low half
    first (how Triton unpacks a packed pair), for random words."""
    g = torch.Generator().manual_seed(0)
    for a, b in torch.randint(0, 2**32, (64, 2), generator=g, dtype=torch.int64).tolist():
        halves = torch.tensor([[r & 0xFFFF, r >> 16] for r in _run_ptx(asm, a, b)], dtype=torch.int32)
        floats = halves.to(torch.int16).view(dtype).float()  # the 16-bit patterns as floats of x's dtype
        expected = torch.tensor([[offset + ((a >> 4 * j) & 15), offset + ((b >> 4 * j) & 15)] for j in range(8)])
        assert torch.equal(floats, expected.float())


def test_tensor_core_kernel_applies_to_4_bit_contiguous_groups_in_bf16_and_fp16():
    assert wna16.mma_applies(4, 128, 4096, torch.bfloat16) and wna16.mma_applies(4, -1, 4096, torch.float16)
    assert not wna16.mma_applies(4, 64, 4096, torch.bfloat16)  # a step of 128 rows would span two groups
    assert not wna16.mma_applies(4, 128, 4096, torch.bfloat16, step_words=32)  # a forced step of 256 rows too
    assert not wna16.mma_applies(4, 0, 4096, torch.bfloat16)  # act-order
    assert not wna16.mma_applies(4, 128, 4096, torch.float32)
    assert not wna16.mma_applies(8, 128, 4096, torch.bfloat16)


def test_two_to_sixteen_rows_take_the_tensor_core_kernel(monkeypatch):
    """Decode batches of 2 to 16 rows (bf16, 4 bits, groups of 128) go to the tensor-core kernel; one row to the
    GEMV, 17 to the fused kernel."""
    taken = []
    for name in ("wna16_mma", "wna16_gemv"):
        monkeypatch.setattr(wna16, name, lambda x2, qweight, *args, _name=name, **kwargs: taken.append(_name)
                            or x2.new_zeros(x2.shape[0], qweight.shape[1]))
    monkeypatch.setattr(wna16, "_fused_config", lambda *args: taken.append("fused") or (16, 16, 32, 1, 4, 2))
    # only the choice is checked: no launch (the tensors are on the CPU, which a GPU run's Triton does not read)
    monkeypatch.setattr(wna16, "_wna16_fused_kernel", collections.defaultdict(lambda: lambda *args, **kwargs: None))
    (qweight, scales, zeros, g_idx), hint = make_layer(256, 48, 4, 128, False, seed=1)
    for m in (1, 2, 16, 17):
        wna16.wna16_linear(torch.zeros(m, 256, dtype=torch.bfloat16), qweight, scales, zeros, g_idx, 4, None, hint)
    assert taken == ["wna16_gemv", "wna16_mma", "wna16_mma", "fused"]


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("m", [2, 3, 16, 64])
@pytest.mark.parametrize(("k", "n", "group_size"), [(4096, 6144, 128), (14336, 4096, 128), (2048, 1024, -1)])
def test_tensor_core_kernel_on_the_gpu(m, k, n, group_size, dtype):
    """The PTX conversion at the default launch against the float32 reference."""
    check(m, k, n, 4, group_size, False, dtype, True, mma_config=wna16._mma_config(m, k, n))
