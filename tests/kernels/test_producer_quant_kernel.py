"""The ops that quantize their own output for a W8A8 linear (kernels/norm.py `rms_norm_quant`,
`fused_add_rms_norm_quant`; kernels/activation.py `silu_and_mul_quant`, `gelu_tanh_and_mul_quant`) against the path
they replace, the plain Triton op and then the Triton quantizer (kernels/act_quant.py): 8-bit rows, scales and the
new residual bit for bit, so arming them changes no output. (The plain ops and the quantizer are tested against the
torch references in test_kernels.py and test_act_quant_kernel.py.) int8 also under the Triton interpreter; float8
on a GPU of compute capability 8.9 or newer (the interpreter's float8 cast is not the hardware's), elsewhere only
compiled for sm_90 (test_zz_sm90_compile)."""

import contextlib

import pytest
import torch
from sm90_compile import record_only
from test_kernels import CUDA, DEVICE

from engine.kernels import act_quant, activation, norm

FP8_OK = CUDA and torch.cuda.get_device_capability() >= (8, 9)
QDTYPES = pytest.mark.parametrize("qdtype", [torch.int8, torch.float8_e4m3fn], ids=["int8", "fp8"])
XDTYPES = pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])


@contextlib.contextmanager
def fp8_checked_on_gpus_only(qdtype):
    """Without a float8 GPU the launches inside are only recorded, for test_zz_sm90_compile, and the test skips."""
    if qdtype != torch.float8_e4m3fn or FP8_OK:
        yield
        return
    with record_only():
        yield
    pytest.skip("float8 e4m3 is compared on a GPU of compute capability 8.9 or newer only (compiled here)")


def assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g.float(), w.float(), rtol=0, atol=0)


@QDTYPES
@XDTYPES
@pytest.mark.parametrize(("tokens", "hidden"), [(5, 96), (3, 1000), (2, 4096)])  # several rows a program; one
@pytest.mark.parametrize("fused_add", [False, True], ids=["norm", "add+norm"])
def test_norm_quant_equals_norm_then_quantize(qdtype, xdtype, tokens, hidden, fused_add):
    g = torch.Generator().manual_seed(tokens * hidden)
    x = (torch.randn(tokens, hidden, generator=g) * 2).to(DEVICE, xdtype)
    x[0, 3] = 40.0  # an outlier sets its row's scale
    residual = torch.randn(tokens, hidden, generator=g).to(DEVICE, xdtype)
    weight = (torch.rand(hidden, generator=g) + 0.5).to(DEVICE, xdtype)
    if fused_add:
        with fp8_checked_on_gpus_only(qdtype):
            got = norm.fused_add_rms_norm_quant(x, residual, weight, 1e-6, 1.0, qdtype)
        normed, summed = norm.fused_add_rms_norm(x, residual, weight, 1e-6, 1.0)
        want = (*act_quant.quantize_activations(normed, qdtype), summed)
    else:
        with fp8_checked_on_gpus_only(qdtype):
            got = norm.rms_norm_quant(x, weight, 1e-6, 0.0, qdtype)
        want = act_quant.quantize_activations(norm.rms_norm(x, weight, 1e-6, 0.0), qdtype)
    assert_same(got, want)
    assert got[1].shape == (tokens, 1)


@QDTYPES
@XDTYPES
@pytest.mark.parametrize(("tokens", "d"), [(4, 40), (2, 1500)])
@pytest.mark.parametrize("gelu", [False, True], ids=["silu", "gelu_tanh"])
def test_act_and_mul_quant_equals_act_then_quantize(qdtype, xdtype, tokens, d, gelu):
    g = torch.Generator().manual_seed(tokens + d)
    x = (torch.randn(tokens, 2 * d, generator=g) * 3).to(DEVICE, xdtype)
    x[-1] = 0.0  # a row of zeros: the scale's floor, no division by zero
    fused, plain = ((activation.gelu_tanh_and_mul_quant, activation.gelu_tanh_and_mul) if gelu
                    else (activation.silu_and_mul_quant, activation.silu_and_mul))
    with fp8_checked_on_gpus_only(qdtype):
        got = fused(x, qdtype)
    assert_same(got, act_quant.quantize_activations(plain(x), qdtype))


def test_act_and_mul_quant_wider_than_a_program_takes_the_plain_op_and_the_quantizer(monkeypatch):
    monkeypatch.setattr(activation, "_MAX_QUANT_WIDTH", 32)
    x = torch.randn(3, 2 * 48, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.bfloat16)
    want = act_quant.quantize_activations(activation.silu_and_mul(x), torch.int8)
    assert_same(activation.silu_and_mul_quant(x, torch.int8), want)
