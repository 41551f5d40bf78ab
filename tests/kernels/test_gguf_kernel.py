"""GGUF blocks: the torch reference (`kernels.reference.dequantize_gguf`) against gguf-py's own dequantize for every
type kvbox keeps packed, on a file written with gguf-py's writer (Q4_0 .. Q8_0 quantized by gguf-py itself; the
K-quants, which gguf-py cannot quantize, built by hand from chosen scales, mins and quants per llama.cpp's layout,
so that the values they stand for are known independently); then the Triton dequant-matmul (kernels/gguf.py)
against that reference on both paths (fused for small batches, dequantize + cuBLAS above `fused_max_rows`).

Without CUDA the kernel cases run under the Triton interpreter at small shapes (see conftest.py); real projection
shapes are marked `gpu`.
"""

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType
from test_kernels import DEVICE, dtype_id, gpu

from engine.kernels import gguf as gguf_kernels
from engine.kernels import reference

SMALL_TYPES = (QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0)
K_TYPES = (QType.Q4_K, QType.Q5_K, QType.Q6_K)
ALL_TYPES = SMALL_TYPES + K_TYPES


def _f16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).view(np.uint8).reshape(*values.shape, 2)


def k_quant_blocks(qtype: QType, rows: int, blocks: int, rng: np.random.Generator):
    """(bytes [rows, blocks * type size], the float32 values they stand for), encoded from random fields."""
    n = rows * blocks
    d = rng.uniform(1e-3, 1e-2, n).astype(np.float16).astype(np.float32)
    if qtype == QType.Q6_K:
        q = rng.integers(0, 64, (n, 2, 128))  # two halves of 128 six-bit values
        scales = rng.integers(-128, 128, (n, 16))
        low, high = q & 15, q >> 4
        ql = np.concatenate([low[..., 0:32] | low[..., 64:96] << 4, low[..., 32:64] | low[..., 96:128] << 4], -1)
        qh = high[..., 0:32] | high[..., 32:64] << 2 | high[..., 64:96] << 4 | high[..., 96:128] << 6
        data = np.concatenate([ql.reshape(n, 128).astype(np.uint8), qh.reshape(n, 64).astype(np.uint8),
                               scales.astype(np.int8).view(np.uint8), _f16_bytes(d)], -1)
        sub = (d[:, None] * scales.astype(np.float32))[:, :, None]  # [n, 16, 1]
        values = sub * (q.reshape(n, 16, 16) - 32).astype(np.float32)
        return data.reshape(rows, -1), values.reshape(rows, -1)
    bits = 4 if qtype == QType.Q4_K else 5
    dmin = rng.uniform(1e-3, 1e-2, n).astype(np.float16).astype(np.float32)
    sc, mins = rng.integers(0, 64, (n, 8)), rng.integers(0, 64, (n, 8))
    q = rng.integers(0, 1 << bits, (n, 8, 32))
    packed_scales = np.concatenate([sc[:, :4] | (sc[:, 4:] >> 4) << 6, mins[:, :4] | (mins[:, 4:] >> 4) << 6,
                                    (sc[:, 4:] & 15) | (mins[:, 4:] & 15) << 4], -1)
    qs = (q[:, 0::2] & 15) | (q[:, 1::2] & 15) << 4  # [n, 4, 32]: sub-blocks 2i and 2i + 1 share 32 bytes
    parts = [_f16_bytes(d), _f16_bytes(dmin), packed_scales.astype(np.uint8)]
    if bits == 5:  # [n, 32]: bit j holds sub-block j's fifth bit
        parts.append(sum((q[:, j] >> 4) << j for j in range(8)).astype(np.uint8))
    data = np.concatenate([*parts, qs.reshape(n, 128).astype(np.uint8)], -1)
    values = ((d[:, None] * sc)[:, :, None] * q.astype(np.float32) - (dmin[:, None] * mins)[:, :, None])
    return data.reshape(rows, -1), values.reshape(rows, -1)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """{type: (the tensor as read back from a GGUF file, the float32 values it stands for or None)}."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("gguf") / "types.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    known = {}
    for qtype in ALL_TYPES:
        if qtype in SMALL_TYPES:
            data, known[qtype] = gguf.quants.quantize(rng.standard_normal((6, 96)).astype(np.float32), qtype), None
        else:
            data, known[qtype] = k_quant_blocks(qtype, 6, 2, rng)
        writer.add_tensor(f"t{int(qtype)}", data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {t.tensor_type: (np.array(t.data), known[t.tensor_type]) for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_reference_dequantizes_as_gguf_py_does(written, qtype):
    data, values = written[qtype]
    want = gguf.quants.dequantize(data, qtype)
    if values is not None:  # the hand-built K-quant blocks are what gguf-py reads them as
        np.testing.assert_array_equal(want, values)
    np.testing.assert_array_equal(reference.dequantize_gguf(torch.from_numpy(data), int(qtype)).numpy(), want)


# (atol, rtol) for outputs of about unit size; the weight is rounded to x's dtype as in the reference.
TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (1.6e-2, 1.6e-2), torch.float16: (2e-3, 2e-3)}


def random_weight(qtype: QType, n: int, k: int, seed: int) -> torch.Tensor:
    """Packed [n, k] with outputs of about unit size for unit inputs."""
    rng = np.random.default_rng(seed)
    if qtype in SMALL_TYPES:
        data = gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32) / k**0.5, qtype)
    else:
        data, _ = k_quant_blocks(qtype, n, k // 256, rng)
        values = gguf.quants.dequantize(data, qtype)
        return torch.from_numpy(data), float(np.abs(values).std() * k**0.5)
    return torch.from_numpy(data), 1.0


def check(qtype, m, n, k, dtype, bias, **options):
    (packed, spread), g = random_weight(qtype, n, k, seed=m + n), torch.Generator().manual_seed(m)
    x = (torch.randn(m, k, generator=g) / spread).to(DEVICE, dtype)
    b = torch.randn(n, generator=g).to(DEVICE, dtype) if bias else None
    packed = packed.to(DEVICE)
    out = gguf_kernels.gguf_linear(x, packed, int(qtype), b, **options)
    weight = reference.dequantize_gguf(packed, int(qtype)).to(dtype).float()
    expected = torch.nn.functional.linear(x.float(), weight, None if b is None else b.float())
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out, expected.to(dtype), atol=atol, rtol=rtol)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_fused_kernel_matches_reference(qtype):
    k = 256 if qtype in K_TYPES else 64
    check(qtype, 3, 40, k, torch.float32, bias=True)  # masked output features, a bias


@pytest.mark.parametrize("qtype", [QType.Q4_K, QType.Q8_0], ids=lambda t: t.name)
def test_dequantize_then_gemm_path_matches_reference(qtype):
    check(qtype, 6, 24, 256, torch.float32, bias=False, fused_max_rows=4)


def test_bfloat16_rounds_the_weight_like_the_reference():
    check(QType.Q6_K, 2, 32, 256, torch.bfloat16, bias=False)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("m", [1, 7, 64, 256, 300, 1024])
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_llama_8b_shapes_on_the_gpu(qtype, m, dtype):
    check(qtype, m, 4096, 4096, dtype, bias=False)
    check(qtype, m, 1024, 14336, dtype, bias=True)
