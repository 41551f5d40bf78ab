"""Quantized tiny models on the GPU (Triton W4A16 kernel, cuBLAS W8A8) against the same checkpoint on the CPU
reference path. Skipped without CUDA.

Weight-only formats in float32: the kernel dequantizes exactly as the reference does and sums in float32, so greedy
tokens must be identical. W8A8 (online fp8 / int8) in bfloat16: the FP8 GEMM writes bfloat16 and the CPU emulation
float32, so the rule is the one of the CPU W8A8 tests: the mean absolute logprob difference along the greedy path
stays a small fraction of what the quantization itself moves.
"""

import importlib.util

import pytest
import torch

from engine import LLM, SamplingParams
from test_quantization import SHAPE, write_format

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
PROMPTS = [[5, 17, 99, 3], list(range(40, 70)), list(range(100, 400))]  # the long one takes the dequantize path
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    from engine.tools.tiny_model import build_tiny_model
    return build_tiny_model("llama", tmp_path_factory.mktemp("float"), max_position_embeddings=512, **SHAPE)


def greedy(model_dir, device, dtype="float32", **options):
    llm = LLM(str(model_dir), dtype=dtype, device=device, num_kv_blocks=64, **options)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1)
    return [o.outputs[0] for o in llm.generate(PROMPTS, params, use_tqdm=False)]


@pytest.mark.parametrize("name", ["gptq-4b-g32-asym-actorder", "gptq-4b-g128-sym", "gptq-8b-g64-sym-actorder", "awq-g64",
                                  pytest.param("ct-w4a16-g64-asym", marks=pytest.mark.skipif(
                                      importlib.util.find_spec("compressed_tensors") is None,
                                      reason="compressed-tensors writes it"))])
def test_weight_only_gpu_tokens_match_the_cpu_path(float_model, tmp_path, name):
    write_format(name, float_model, tmp_path / "q")
    gpu = greedy(tmp_path / "q", "cuda", kernel_backend="triton")
    cpu = greedy(tmp_path / "q", "cpu")
    assert [o.token_ids for o in gpu] == [o.token_ids for o in cpu], name


def forced_logprobs(model_dir, device, sequences, **options) -> torch.Tensor:
    """Each position's logprob of the token that follows it in `sequences` (teacher forcing): every path is judged on
    the same tokens, so a bf16 near-tie that sends free-running paths apart cannot hide or fake a difference."""
    llm = LLM(str(model_dir), dtype="bfloat16", device=device, num_kv_blocks=64, **options)
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    outputs = llm.generate(sequences, params, use_tqdm=False)
    return torch.tensor([e.logprobs[0] for o in outputs for e in o.prompt_logprobs if e is not None])


@pytest.mark.parametrize("method, outlier_fraction", [("fp8", None), ("fp8", 0.01), ("int8", None), ("int8", 0.05)])
def test_w8a8_gpu_follows_the_cpu_emulation(float_model, method, outlier_fraction):
    """The GPU's 8-bit GEMMs against the CPU's float32 emulation of the same scheme (with or without input channels
    kept in float), on the float model's greedy continuations: the mean logprob gap between them
    stays under half of what the quantization itself moves (the CPU tests show this rule failing for a scale off by
    25%)."""
    if method == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 GEMMs need compute capability 8.9")
    sequences = [p + o.token_ids for p, o in zip(PROMPTS, greedy(float_model, "cpu", "bfloat16"))]
    quantized_gpu = forced_logprobs(float_model, "cuda", sequences, quantization=method, kernel_backend="triton",
                                    outlier_fraction=outlier_fraction)
    quantized_cpu = forced_logprobs(float_model, "cpu", sequences, quantization=method,
                                    outlier_fraction=outlier_fraction)
    float_cpu = forced_logprobs(float_model, "cpu", sequences)
    effect = (quantized_cpu - float_cpu).abs().mean().item()
    gap = (quantized_gpu - quantized_cpu).abs().mean().item()
    assert gap <= 0.5 * effect + 1e-3, (method, gap, effect)
