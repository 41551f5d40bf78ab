"""The decode-sized linear kernel (kernels/gemv.py) against `kernels.reference.linear`, on fresh random inputs:
1 to 16 rows, widths that are and are not multiples of the tiles, with and without bias, strided inputs; and the
dispatcher, which must fall back to torch wherever the kernel does not apply.

Without CUDA the small cases run under the Triton interpreter (see conftest.py); Llama-3.1-8B's projections are
marked `gpu`.
"""

import pytest
import torch
from test_kernels import CPU_DTYPES, DEVICE, GPU_DTYPES, dtype_id, gpu

from engine.kernels import gemv, reference

# (atol, rtol) for outputs of about unit size: the kernel sums in float32 in another order than torch and rounds once.
TOL = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def make_inputs(m, n, k, dtype, bias, seed):
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(m, k + 8, generator=g)  # a strided view, as a slice of a merged projection would be
    weight = torch.randn(n, k, generator=g) * k**-0.5
    b = torch.randn(n, generator=g) if bias else None
    to = dict(device=DEVICE, dtype=dtype)
    return wide.to(**to)[:, :k], weight.to(**to), None if b is None else b.to(**to)


def check(m, n, k, dtype, bias, seed, **config):
    x, weight, b = make_inputs(m, n, k, dtype, bias, seed)
    out = gemv.skinny_linear(x, weight, b, **config)
    expected = reference.linear(x.float(), weight.float(), None if b is None else b.float()).to(dtype)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize(("m", "n", "k", "bias"), [
    (1, 48, 64, False),  # tiles divide N and K
    (3, 70, 96, True),  # neither divides: masked columns and a masked last K tile
    (16, 33, 256, False),  # a full tile of rows
    (7, 128, 40, True),  # K below one tile
])
def test_skinny_linear_matches_reference(m, n, k, bias, dtype):
    check(m, n, k, dtype, bias, seed=m * n, block_n=16, block_k=32)


def test_three_dimensional_input_keeps_its_shape():
    x, weight, _ = make_inputs(4, 32, 64, torch.float32, False, seed=1)
    out = gemv.skinny_linear(x.reshape(2, 2, 64), weight, block_n=16, block_k=32)
    assert out.shape == (2, 2, 32)
    torch.testing.assert_close(out.reshape(4, 32), reference.linear(x, weight), atol=1e-4, rtol=1e-4)


def test_refusals():
    x, weight, _ = make_inputs(17, 32, 64, torch.float32, False, seed=2)
    with pytest.raises(ValueError, match="at most 16 rows"):
        gemv.skinny_linear(x, weight)
    with pytest.raises(ValueError, match="features"):
        gemv.skinny_linear(x[:2, :32], weight)


def test_dispatch_falls_back_to_torch_where_the_kernel_does_not_apply():
    """More than 16 rows or float32 (and anything on the CPU): exactly torch's result."""
    for m, dtype in ((17, torch.bfloat16), (2, torch.float32)):
        x, weight, b = make_inputs(m, 48, 64, dtype, True, seed=3)
        assert torch.equal(gemv.linear(x, weight, b), reference.linear(x, weight, b))


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("m", [1, 2, 4, 8, 16])
@pytest.mark.parametrize(("n", "k"), [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)],
                         ids=["qkv", "o", "gate_up", "down", "lm_head"])
def test_gpu_llama_projections(m, n, k, dtype):
    check(m, n, k, dtype, bias=False, seed=m)
    x, weight, _ = make_inputs(m, n, k, dtype, False, seed=m)
    if dtype != torch.float32:  # what the model's layers call: kernel or cuBLAS, the same numbers within tolerance
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(gemv.linear(x, weight), reference.linear(x, weight), atol=atol, rtol=rtol)


def test_wide_weights_take_the_short_k_tiles():
    """gate/up- and LM-head-wide half-precision weights (16384 outputs and more) run 128-wide K tiles, the rest
    512-wide; the wide launch is checked here too (under the interpreter on the CPU), K past one tile with a masked
    tail and N no multiple of the column block."""
    assert gemv._config(16400, 2)["block_k"] == 128 and gemv._config(16400, 4)["block_k"] == 512
    assert gemv._config(6144, 2)["block_k"] == 512
    check(3, 16400, 200, torch.bfloat16, bias=True, seed=5)
