"""Weight-only checkpoints split for tensor parallelism: each rank's dequantized weights, side by side (column-
parallel linears along the outputs, row-parallel ones along the inputs), are the single-rank model's exactly. GPTQ's
and compressed-tensors' act-order groups take any input row, so a row-parallel rank keeps every group's scales and
its rows' g_idx. Two ranks of an engine then answer as one."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.kernels.reference import dequantize_wna16
from engine.models.config import ModelConfig
from engine.models.loader import load_model
from engine.tools import quantized_checkpoints as qc
from tests.test_quantization import SHAPE, ct_actorder_writer, ct_pack_writer

CPU = torch.device("cpu")
FORMATS = {
    "gptq-4b-g32-asym-actorder": lambda: (qc.gptq_config(4, 32, False, True),
                                          lambda w: qc.gptq_tensors(w, 4, 32, False, True)),
    "gptq-8b-g64-sym": lambda: (qc.gptq_config(8, 64, True, False), lambda w: qc.gptq_tensors(w, 8, 64, True, False)),
    "gptq-4b-channel": lambda: (qc.gptq_config(4, -1, False, False),
                                lambda w: qc.gptq_tensors(w, 4, -1, False, False)),
    "awq-g32": lambda: (qc.awq_config(32), lambda w: qc.awq_tensors(w, 32)),
    "ct-w4a16-g32-asym": lambda: ct_pack_writer(4, 32, False),
    "ct-w8a16-channel-asym": lambda: ct_pack_writer(8, None, False),
    "ct-w4a16-g32-asym-actorder": lambda: ct_actorder_writer(4, 32),
}


def dequantized(module, bits: int) -> torch.Tensor:
    return dequantize_wna16(module.qweight, module.scales, module.zeros, module.g_idx, bits)  # [out, in]


@pytest.mark.parametrize("name", list(FORMATS))
def test_ranks_hold_slices_of_the_whole_weights(tiny_model, tmp_path, name):
    config_dict, writer = FORMATS[name]()
    qc.write_quantized(tiny_model("llama", **SHAPE), tmp_path / "q", config_dict, writer)
    config = ModelConfig.from_pretrained(tmp_path / "q", dtype="float32")
    whole = load_model(config, tmp_path / "q", CPU)
    ranks = [load_model(config, tmp_path / "q", CPU, tp_rank=rank, tp_size=2) for rank in range(2)]
    bits = whole.quant_scheme.bits
    for layer in range(len(whole.model.layers)):
        for path, dim in (("self_attn.o_proj", 1), ("mlp.down_proj", 1), ("mlp.gate_up_proj", 0)):
            shards = [dequantized(model.model.layers[layer].get_submodule(path), bits) for model in ranks]
            want = dequantized(whole.model.layers[layer].get_submodule(path), bits)
            if dim == 0:  # each rank holds its half of gate, then its half of up
                (gate0, gate1), (up0, up1) = (part.chunk(2) for part in want.chunk(2))
                want = torch.cat([gate0, up0, gate1, up1])
            assert torch.equal(torch.cat(shards, dim=dim), want), (name, layer, path)


@pytest.mark.parametrize("name", ["gptq-4b-g32-asym-actorder", "awq-g32"])
def test_two_ranks_of_a_quantized_checkpoint_answer_as_one(tiny_model, tmp_path, name):
    config_dict, writer = FORMATS[name]()
    qc.write_quantized(tiny_model("llama", **SHAPE), tmp_path / "q", config_dict, writer)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2)
    outputs = []
    for tp_size in (1, 2):
        llm = LLM(str(tmp_path / "q"), dtype="float32", device="cpu", tensor_parallel_size=tp_size)
        try:
            outputs.append(llm.generate(["Once upon a time", "1 2 3 4 5"], params, use_tqdm=False))
        finally:
            llm.shutdown()
    for want, got in zip(*outputs):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        for a, b in zip(want.outputs[0].logprobs, got.outputs[0].logprobs):
            assert a.token_ids == b.token_ids
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4  # sums split: float32 rounding


@pytest.mark.parametrize("method", ["fp8", "int8"])
def test_ranks_of_online_quantization_hold_slices_of_the_float_last_down_projection(tiny_model, method):
    folder = tiny_model("llama", **SHAPE)
    config = ModelConfig.from_pretrained(folder, dtype="float32")
    whole = load_model(config, folder, CPU, quantization=method)
    ranks = [load_model(config, folder, CPU, quantization=method, tp_rank=rank, tp_size=2) for rank in range(2)]
    last = f"model.layers.{config.num_layers - 1}.mlp.down_proj"
    shards = [model.get_submodule(last).weight for model in ranks]
    assert all(shard.dtype == torch.float32 for shard in shards)
    assert torch.equal(torch.cat(shards, dim=1), whole.get_submodule(last).weight)
    assert all(model.model.layers[0].mlp.down_proj.weight.dtype != torch.float32 for model in ranks)
