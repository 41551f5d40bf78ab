"""GGUF models kept packed on the GPU (the Triton dequant-matmul of kernels/gguf.py) against the same file on the CPU
reference path. Skipped without CUDA. In float32 the kernel dequantizes exactly as the reference does and sums in
float32, so greedy tokens must be identical; the long prompt takes the dequantize + cuBLAS path.
"""

import pytest
import torch
from gguf import GGMLQuantizationType as QType
from test_gguf import SMOLLM2, needs_smollm2, write_gguf

from engine import LLM, SamplingParams
from engine.tools.tiny_model import build_tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
PROMPTS = [[5, 17, 99, 3], list(range(40, 70)), list(range(100, 400))]
NEW_TOKENS = 12
MIXES = {  # a file type, and the tensors Q4_K_M-like files keep in another type
    "Q4_0": (QType.Q4_0, {}), "Q4_1": (QType.Q4_1, {}), "Q5_0": (QType.Q5_0, {}), "Q5_1": (QType.Q5_1, {}),
    "Q8_0": (QType.Q8_0, {}), "Q5_K": (QType.Q5_K, {}), "Q6_K": (QType.Q6_K, {}),
    "Q4_K_M": (QType.Q4_K, {"v_proj": QType.Q6_K, "down_proj": QType.Q6_K, "embed_tokens": QType.Q8_0}),
}


def greedy(model, device, **options):
    llm = LLM(str(model), dtype="float32", device=device, num_kv_blocks=64, **options)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    return build_tiny_model("llama", tmp_path_factory.mktemp("llama256"), hidden_size=256, intermediate_size=512,
                            head_dim=64, max_position_embeddings=512)


@pytest.mark.parametrize("mix", list(MIXES))
def test_gpu_tokens_match_the_cpu_path(float_model, tmp_path, mix):
    qtype, overrides = MIXES[mix]
    write_gguf(float_model, tmp_path / "model.gguf", "llama", qtype, overrides)
    path, tokenizer = tmp_path / "model.gguf", str(float_model)  # the tiny GGUF carries no tokenizer
    assert (greedy(path, "cuda", kernel_backend="triton", tokenizer=tokenizer)
            == greedy(path, "cpu", tokenizer=tokenizer))


@needs_smollm2
def test_smollm2_on_the_gpu_matches_the_cpu_path():
    assert greedy(SMOLLM2, "cuda", kernel_backend="triton") == greedy(SMOLLM2, "cpu")
