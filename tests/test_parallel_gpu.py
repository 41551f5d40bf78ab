"""Tensor and data parallelism on real GPUs (NCCL), the equivalence run of issue #26: the same tiny checkpoints and
checks as the CPU (gloo) tests, skipped where fewer GPUs are visible than a case needs."""

import pytest
import torch

from engine import LLM
from test_tensor_parallel import FAMILIES, GREEDY, PROMPTS, SEEDED, assert_same


def run(model_dir: str, **options) -> list:
    llm = LLM(model_dir, dtype="float32", device="cuda", **options)
    try:
        return [llm.generate(PROMPTS, params, use_tqdm=False) for params in (GREEDY, SEEDED)]
    finally:
        llm.shutdown()


@pytest.mark.gpu
# Pipeline stages replay CUDA graphs too (the runner receives and sends around the replay).
@pytest.mark.parametrize("options", [dict(tensor_parallel_size=2), dict(tensor_parallel_size=4),
                                     dict(pipeline_parallel_size=2),
                                     dict(tensor_parallel_size=2, pipeline_parallel_size=2),
                                     dict(data_parallel_size=2)], ids=["tp2", "tp4", "pp2", "tp2pp2", "dp2"])
@pytest.mark.parametrize("family", FAMILIES)
def test_ranks_and_replicas_on_gpus_answer_as_one(tiny_model, family, options):
    needed = options.get("tensor_parallel_size", 1) * options.get("pipeline_parallel_size", 1)
    needed = max(needed, options.get("data_parallel_size", 1))
    if torch.cuda.device_count() < needed:
        pytest.skip(f"needs {needed} CUDA devices, {torch.cuda.device_count()} visible")
    model_dir = tiny_model(family, **FAMILIES[family])
    assert_same(run(model_dir), run(model_dir, **options))
