"""The whole engine against Hugging Face transformers on the same tiny checkpoints.

For every family: greedy tokens identical and prompt/sample logprobs within 1e-4 of `AutoModelForCausalLM` in
float32, for a batch of prompts of different lengths — plainly, with chunked prefill forced (a tiny token budget, or
a tiny prefill cap beside decodes), with preemption forced (a tiny KV pool, recomputing or swapping to host memory)
and with prefix-cache hits.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams
from engine.tools.tiny_model import FAMILIES

NUM_NEW_TOKENS = 10
PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog, and then",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n\n"
    "print([fibonacci(i) for i in range(10)])  # café, naïve, 日本語",
]
LOGPROB_TOL = 1e-4

# Engine options that force each mechanism on these short prompts (the longest is ~60 tokens, max_model_len 128).
VARIANTS = {
    "plain": {},
    "chunked_prefill": {"max_num_batched_tokens": 7},
    # "Hello" decodes from the second step on; the longer prompts then go in 3-token chunks beside it.
    "prefill_cap_while_decoding": {"max_num_batched_tokens": 32, "max_prefill_tokens_while_decoding": 3},
    "preemption": {"num_kv_blocks": 9, "block_size": 16},  # 3 requests of ~70 tokens need 12 blocks
    # The next step scheduled before the last one's tokens are on the host, with chunks and preemptions in between.
    "async_scheduling": {"async_scheduling": True, "max_num_batched_tokens": 16, "num_kv_blocks": 9},
    # Preempted requests' K/V moved to host memory and back (async, chunked) instead of recomputed.
    "swap": {"async_scheduling": True, "max_num_batched_tokens": 16, "num_kv_blocks": 9, "host_swap_bytes": 1 << 24},
}


def hf_reference(model_dir, prompt_ids_list):
    """Greedy continuation plus logprobs of every token (prompt and generated) from transformers."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    results = []
    with torch.no_grad():
        for prompt_ids in prompt_ids_list:
            ids = list(prompt_ids)
            for _ in range(NUM_NEW_TOKENS):
                logits = model(torch.tensor([ids])).logits[0, -1]
                ids.append(int(logits.argmax()))
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
            # logprobs[p] predicts token p + 1
            token_logprobs = [float(logprobs[p, ids[p + 1]]) for p in range(len(ids) - 1)]
            results.append((ids[len(prompt_ids):], token_logprobs))
    return results


@pytest.fixture(scope="module", params=FAMILIES)
def family_setup(request, tiny_model):
    model_dir = tiny_model(request.param, max_position_embeddings=128)
    llm = LLM(model_dir, dtype="float32", device="cpu")
    prompt_ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    del llm
    return request.param, model_dir, prompt_ids, hf_reference(model_dir, prompt_ids)


def check_against_reference(outputs, prompt_ids, reference):
    for output, ids, (ref_tokens, ref_logprobs) in zip(outputs, prompt_ids, reference):
        completion = output.outputs[0]
        assert completion.token_ids == ref_tokens
        sampled = [entry.logprobs[0] for entry in completion.logprobs]
        assert sampled == pytest.approx(ref_logprobs[len(ids) - 1:], abs=LOGPROB_TOL)
        prompt_lp = [entry.logprobs[0] for entry in output.prompt_logprobs[1:]]
        assert output.prompt_logprobs[0] is None and len(prompt_lp) == len(ids) - 1
        assert prompt_lp == pytest.approx(ref_logprobs[:len(ids) - 1], abs=LOGPROB_TOL)
        for entry in completion.logprobs:  # greedy: the sampled token is the most likely one
            assert entry.rank == 1


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_matches_transformers(family_setup, variant):
    family, model_dir, prompt_ids, reference = family_setup
    llm = LLM(model_dir, dtype="float32", device="cpu", **VARIANTS[variant])
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True, logprobs=2,
                            prompt_logprobs=1)
    outputs = llm.generate(prompt_ids, params, use_tqdm=False)
    check_against_reference(outputs, prompt_ids, reference)
    stats = llm.core.stats()
    if variant in ("preemption", "async_scheduling", "swap"):
        assert stats.num_preemptions > 0
    if variant == "swap":
        assert stats.swap.num_swapped_in_blocks == stats.swap.num_swapped_out_blocks > 0
        assert stats.swap.num_used_host_blocks == 0
    if variant == "chunked_prefill":
        assert llm.core.num_steps > NUM_NEW_TOKENS + 1
    assert stats.num_free_blocks == stats.num_kv_blocks  # every block came back
    assert llm.core.scheduler.num_unfinished == 0


def test_prefix_cache_hit_gives_same_tokens(family_setup):
    family, model_dir, prompt_ids, reference = family_setup
    llm = LLM(model_dir, dtype="float32", device="cpu", block_size=8)
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True, logprobs=0)
    llm.generate(prompt_ids, params, use_tqdm=False)
    outputs = llm.generate(prompt_ids, params, use_tqdm=False)  # same prompts: full blocks come from the cache
    assert outputs[2].num_cached_tokens >= 8 * ((len(prompt_ids[2]) - 1) // 8) > 0
    for output, (ref_tokens, ref_logprobs), ids in zip(outputs, reference, prompt_ids):
        assert output.outputs[0].token_ids == ref_tokens
        sampled = [entry.logprobs[0] for entry in output.outputs[0].logprobs]
        assert sampled == pytest.approx(ref_logprobs[len(ids) - 1:], abs=LOGPROB_TOL)
