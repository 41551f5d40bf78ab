"""Offline beam search: at a fixed length the beams equal transformers' `generate(num_beams=...)` (tokens, order,
scores), and the beams' shared blocks all go back to the pool."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLM, BeamSearchParams, InvalidParameterError

PROMPTS = [[10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28], [100, 101, 102, 103] * 3]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_beams_equal_transformers_at_fixed_length(tiny_model, family):
    model_dir = tiny_model(family, max_position_embeddings=256)
    llm = LLM(model_dir, dtype="float32", device="cpu", block_size=8)
    width, length = 3, 6
    outputs = llm.beam_search(PROMPTS + [{"prompt": "The quick brown fox"}],
                              BeamSearchParams(beam_width=width, max_tokens=length, ignore_eos=True))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prompts = PROMPTS + [llm.tokenizer.encode("The quick brown fox")]
    for prompt, output in zip(prompts, outputs):
        with torch.no_grad():
            expected = model.generate(torch.tensor([prompt]), num_beams=width, num_return_sequences=width,
                                      max_new_tokens=length, min_new_tokens=length, do_sample=False,
                                      length_penalty=1.0, output_scores=True, return_dict_in_generate=True)
        assert [s.tokens for s in output.sequences] == expected.sequences[:, len(prompt):].tolist()
        scores = [s.cum_logprob / length for s in output.sequences]
        torch.testing.assert_close(torch.tensor(scores), expected.sequences_scores.float(), atol=1e-4, rtol=0)
        assert output.sequences[0].text == llm.tokenizer.decode(output.sequences[0].tokens, skip_special_tokens=True)


def test_no_block_leaks_after_many_beam_searches(tiny_model):
    llm = LLM(tiny_model("llama", max_position_embeddings=256), dtype="float32", device="cpu", num_kv_blocks=64,
              block_size=8)
    pool = llm.core.kv_manager.pool
    free_at_start = pool.num_free_blocks
    for i in range(20):
        outputs = llm.beam_search([[5 + i] * 9, [7, 8, 9, i]], BeamSearchParams(beam_width=4, max_tokens=5))
        assert all(1 <= len(o.sequences) <= 4 for o in outputs)
        assert pool.num_free_blocks == free_at_start
    assert pool.num_prefix_hits > 0  # the beams shared their blocks through the prefix cache


def test_bad_beam_search_params_name_the_field():
    for kwargs, param in (({"beam_width": 0, "max_tokens": 4}, "beam_width"),
                          ({"beam_width": 11, "max_tokens": 4}, "beam_width"),
                          ({"beam_width": 2, "max_tokens": 0}, "max_tokens")):
        with pytest.raises(InvalidParameterError) as e:
            BeamSearchParams(**kwargs)
        assert e.value.param == param
