"""The CUDA 8-bit linears (kernels/w8a8.py: FP8 through torch._scaled_mm, INT8 through torch._int_mm) against
`kernels.reference.w8a8_linear`, which quantizes the activations the same way and emulates the GEMM in float32.
cuBLAS only runs on CUDA, so those cases are marked `gpu`; FP8 also needs compute capability 8.9. Asymmetric int8
activations (the zero point's share taken off the int32 accumulator) also run without CUDA: torch._int_mm has a CPU
kernel and the quantizer runs under the Triton interpreter.
"""

import pytest
import torch
from test_kernels import CUDA, DEVICE, gpu

from engine.kernels import reference

FP8_OK = CUDA and torch.cuda.get_device_capability() >= (8, 9)


def make_layer(n, k, dtype, seed, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=g) * k**-0.5
    quantized, scale = reference.quantize_activations(weight, dtype)  # per output channel
    return quantized.to(device), scale[:, 0].to(device)


@gpu
@pytest.mark.parametrize("wdtype", [torch.float8_e4m3fn, torch.int8], ids=["fp8", "int8"])
@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("m", [1, 16, 17, 300])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_w8a8_matches_emulation(m, xdtype, wdtype, static):
    if wdtype == torch.float8_e4m3fn and not FP8_OK:
        pytest.skip("FP8 GEMMs need compute capability 8.9")
    from engine.kernels import w8a8

    n, k = 512, 1024
    weight, weight_scale = make_layer(n, k, wdtype, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to("cuda", xdtype)
    bias = torch.randn(n, device="cuda", dtype=xdtype)
    input_scale = torch.tensor(4.0 / 448 if wdtype == torch.float8_e4m3fn else 4.0 / 127, device="cuda") \
        if static else None
    out = w8a8.w8a8_linear(x, weight, weight_scale, input_scale, bias)
    expected = reference.w8a8_linear(x, weight, weight_scale, input_scale, bias)
    # Both sum the same quantized products (exactly for int8); the GPU's output passes through bfloat16 (FP8).
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)


@gpu
def test_weight_only_and_block_scales_dequantize():
    """Per-channel and 128 x 128 block scales, the last block row and column cut short (200 x 320)."""
    from engine.kernels import w8a8

    weight, channel_scale = make_layer(200, 320, torch.float8_e4m3fn, seed=3)
    block_scale = torch.rand(2, 3, device="cuda") * 0.01 + 0.001
    x = torch.randn(5, 320, device="cuda", dtype=torch.bfloat16)
    for scale, block_size in ((channel_scale, None), (block_scale, (128, 128))):
        out = w8a8.w8a8_linear(x, weight, scale, None, None, quantize_input=False, block_size=block_size)
        expected = torch.nn.functional.linear(x, reference.dequantize_w8(weight, scale, block_size).to(x.dtype))
        torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)



@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("m", [1, 17, 300 if CUDA else 48])  # the interpreter runs a row a program
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_asymmetric_int8_matches_emulation_and_dequantized_math(m, xdtype, static):
    from engine.kernels import act_quant, w8a8

    n, k = 256, 512
    weight, weight_scale = make_layer(n, k, torch.int8, seed=m, device=DEVICE)
    azp_adj = weight.sum(dim=1, dtype=torch.int32)
    g = torch.Generator().manual_seed(m + 1)
    x = (torch.randn(m, k, generator=g) + 0.7).to(DEVICE, xdtype)  # off-centre rows: zero points far from 0
    bias = torch.randn(n, generator=g).to(DEVICE, xdtype)
    scale, zero_point = (torch.tensor(6.0 / 255, device=DEVICE),
                         torch.tensor(-40, dtype=torch.int32, device=DEVICE)) if static else (None, None)
    out = w8a8.w8a8_linear(x, weight, weight_scale, scale, bias, azp_adj=azp_adj, input_zero_point=zero_point)
    expected = reference.w8a8_linear(x, weight, weight_scale, scale, bias, azp_adj=azp_adj,
                                     input_zero_point=zero_point)
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)
    # The zero-point algebra against the plain one: x ~ s (q - z), dequantized, then a float GEMM.
    q, s, z = act_quant.quantize_activations_asym(x, scale, zero_point)
    dequantized = ((q.float() - z.float()) * s) @ reference.dequantize_w8(weight, weight_scale).T + bias.float()
    torch.testing.assert_close(out, dequantized.to(xdtype), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
def test_skinny_int8_matches_emulation(m, static, bias):
    """Up to 16 rows the Triton kernel replaces torch._int_mm (also on the CPU here, through the interpreter): the
    same integer products and sums, so within the output's rounding of the emulation. K is not a multiple of the
    tile (masked tail)."""
    from engine.kernels import w8a8

    n, k = 40, 200
    weight, weight_scale = make_layer(n, k, torch.int8, seed=m, device=DEVICE)
    g = torch.Generator().manual_seed(m + 7)
    x = torch.randn(m, k, generator=g).to(DEVICE, torch.bfloat16)
    b = torch.randn(n, generator=g).to(DEVICE, torch.bfloat16) if bias else None
    scale = torch.tensor(4.0 / 127, device=DEVICE) if static else None
    out = w8a8.w8a8_linear(x, weight, weight_scale, scale, b)
    expected = reference.w8a8_linear(x, weight, weight_scale, scale, b)
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("wdtype", [torch.float8_e4m3fn, torch.int8], ids=["fp8", "int8"])
@pytest.mark.parametrize(("m", "config"), [(1, (16, 64, 4, 2)), (7, (32, 128, 4, 3)), (16, (64, 32, 4, 2))])
def test_skinny_kernel_exact_on_quantized_rows(wdtype, m, config):
    """The kernel alone on rows the reference quantized (the interpreter's fp8 casts round differently from the
    GPU's, so the fp8 quantizer itself is a GPU test): float32 output equals the float32 product of the
    dequantized operands up to summation order, for every launch shape."""
    from engine.kernels import w8a8

    n, k = 72, 160
    weight, weight_scale = make_layer(n, k, wdtype, seed=m, device=DEVICE)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(DEVICE)
    q, scale = reference.quantize_activations(x, wdtype)
    bias = torch.randn(n, device=DEVICE)
    out = w8a8.w8a8_skinny(q, weight, scale, weight_scale, bias, torch.float32, config)
    expected = (q.float() * scale) @ reference.dequantize_w8(weight, weight_scale).T + bias
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
