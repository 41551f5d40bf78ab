import pytest
import torch

from engine.input_batch import CachedRequestState, ScheduledRow
from engine.sampler import (Sampler, SamplingMetadata, apply_min_p, apply_penalties, apply_top_k_top_p,
                            compute_prompt_logprobs)
from engine.sampling_params import SamplingParams

CPU = torch.device("cpu")
VOCAB = 50
EOS = 7


def make_request(i: int = 0, prompt: list[int] | None = None, outputs: list[int] = (), **params) -> ScheduledRow:
    """A sampling row as the runner sees it: the request's last known token computed this step."""
    params.setdefault("max_tokens", 100)
    params = SamplingParams(**params)
    prompt = prompt if prompt is not None else [1, 2, 3]
    token_ids = [*prompt, *outputs]
    state = CachedRequestState(f"r{i}", token_ids, len(prompt), params, frozenset({EOS}), [0], params.seed, None)
    return ScheduledRow(state, len(token_ids) - 1, 1)


def sample(requests: list[ScheduledRow], logits: torch.Tensor):
    return Sampler()(logits, SamplingMetadata.from_rows(requests, CPU))


def random_logits(n: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_plain_greedy_batch_builds_nothing_and_takes_argmax():
    requests = [make_request(i, temperature=0.0) for i in range(4)]
    metadata = SamplingMetadata.from_rows(requests, CPU)
    assert metadata.all_greedy and metadata.temperature is None and metadata.top_k is None
    assert metadata.output_token_ids is None and metadata.logit_bias is None and metadata.min_tokens_mask is None
    assert metadata.max_num_logprobs is None
    logits = random_logits(4)
    before = logits.clone()
    out = Sampler()(logits, metadata)
    assert out.sampled_token_ids.tolist() == logits.argmax(-1).tolist()
    assert out.logprobs is None
    assert torch.equal(logits, before)


def reference_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    out = torch.full_like(logits, float("-inf"))
    for row, (k, p) in enumerate(zip(top_k, top_p)):
        values, ids = logits[row].double().sort(descending=True)
        keep = len(values) if k == 0 else min(k, len(values))
        probs = values[:keep].softmax(-1)
        total, n = 0.0, 0
        while n < keep and total < p:  # the smallest prefix whose mass reaches p
            total += probs[n].item()
            n += 1
        out[row, ids[:n]] = logits[row, ids[:n]]
    return out


def test_top_k_top_p_match_reference():
    logits = random_logits(8, seed=1)
    top_k = [0, 1, 5, 0, 3, 60, 10, 0]
    top_p = [1.0, 1.0, 1.0, 0.5, 0.9, 0.3, 0.95, 0.01]
    got = apply_top_k_top_p(logits, torch.tensor(top_k), torch.tensor(top_p))
    assert torch.equal(got, reference_top_k_top_p(logits, top_k, top_p))
    only_k = apply_top_k_top_p(logits, torch.tensor(top_k), None)
    assert torch.equal(only_k, reference_top_k_top_p(logits, top_k, [1.0] * 8))
    only_p = apply_top_k_top_p(logits, None, torch.tensor(top_p))
    assert torch.equal(only_p, reference_top_k_top_p(logits, [0] * 8, top_p))
    assert apply_top_k_top_p(logits, None, None) is logits


def test_min_p_matches_reference():
    logits = random_logits(4, seed=2)
    min_p = [0.0, 0.05, 0.3, 1.0]
    got = apply_min_p(logits, torch.tensor(min_p))
    for row, m in enumerate(min_p):
        probs = logits[row].softmax(-1)
        expected = torch.where(probs >= m * probs.max(), logits[row], float("-inf"))
        assert torch.equal(got[row], expected)


def test_penalties_match_reference():
    prompts = [[1, 2, 3], [4, 4], [5], []]
    outputs = [[3, 3, 9], [], [5, 6, 6, 6], [10]]
    repetition = [1.3, 1.0, 0.8, 2.0]
    frequency = [0.5, 1.0, -0.5, 0.0]
    presence = [0.2, 0.0, 1.5, -1.0]
    logits = random_logits(4, seed=3)

    def padded(rows):
        width = max(map(len, rows))
        return torch.tensor([r + [-1] * (width - len(r)) for r in rows])

    got = apply_penalties(logits, padded(prompts), padded(outputs), torch.tensor(repetition),
                          torch.tensor(frequency), torch.tensor(presence))
    expected = logits.clone()
    for row in range(4):
        for token_id in set(prompts[row]) | set(outputs[row]):
            value = expected[row, token_id]
            expected[row, token_id] = value / repetition[row] if value > 0 else value * repetition[row]
        for token_id in set(outputs[row]):
            expected[row, token_id] -= outputs[row].count(token_id) * frequency[row] + presence[row]
    torch.testing.assert_close(got, expected)

    # Without prompt ids (no repetition penalty in the batch) only the output-based penalties apply.
    got = apply_penalties(logits, None, padded(outputs), torch.ones(4), torch.tensor(frequency),
                          torch.tensor(presence))
    assert torch.equal(got[1], logits[1])
    assert got[0, 3] == pytest.approx(logits[0, 3].item() - 2 * 0.5 - 0.2)


def test_sampler_applies_penalties_from_requests():
    logits = torch.zeros(1, VOCAB)
    logits[0, 4] = 1.0
    logits[0, 5] = 0.9
    # Token 4 was generated twice: the frequency penalty pushes it under token 5.
    request = make_request(outputs=[4, 4], temperature=0.0, frequency_penalty=0.1)
    assert sample([request], logits).sampled_token_ids.tolist() == [5]
    # A repetition penalty counts prompt tokens too.
    request = make_request(prompt=[4], temperature=0.0, repetition_penalty=1.2)
    assert sample([request], logits).sampled_token_ids.tolist() == [5]


def test_logit_bias():
    logits = random_logits(2, seed=4)
    low = logits[0].argmin().item()
    requests = [make_request(0, temperature=0.0, logit_bias={low: 100.0}), make_request(1, temperature=0.0)]
    out = sample(requests, logits)
    assert out.sampled_token_ids.tolist() == [low, logits[1].argmax().item()]


def test_min_tokens_masks_eos_and_stop_token_ids():
    logits = torch.zeros(3, VOCAB)
    logits[:, EOS] = 10.0
    logits[:, 11] = 9.0
    logits[:, 12] = 8.0
    requests = [
        make_request(0, temperature=0.0, min_tokens=2, outputs=[1]),  # one more token needed: no EOS
        make_request(1, temperature=0.0, min_tokens=2, outputs=[1, 2]),  # enough tokens: EOS allowed
        make_request(2, temperature=0.0, min_tokens=3, stop_token_ids=[11]),  # the stop token is banned too
    ]
    assert sample(requests, logits).sampled_token_ids.tolist() == [11, EOS, 12]


def test_seeded_rows_do_not_depend_on_the_batch():
    steps = 4
    params = {
        "a": dict(seed=1, temperature=0.8, top_k=20, top_p=0.9),
        "b": dict(seed=2, temperature=1.0),
        "c": dict(seed=2, temperature=1.0, min_p=0.05),  # same seed as b, different stream of logits
        "u": dict(temperature=1.0),
        "g": dict(temperature=0.0, seed=5),
    }
    # Each request sees its own logits whatever its row.
    logits = {name: random_logits(steps, seed=i) for i, name in enumerate(params)}

    def run(names: str) -> dict[str, list[int]]:
        requests = [make_request(i, **params[name]) for i, name in enumerate(names)]
        tokens = {name: [] for name in names}
        for step in range(steps):
            batch = torch.stack([logits[name][step] for name in names])
            for name, token_id in zip(names, sample(requests, batch).sampled_token_ids.tolist()):
                tokens[name].append(token_id)
        return tokens

    alone = {name: run(name)[name] for name in "abc"}
    for names in ("aub", "bga", "ucbau", "cba", "gcuab"):
        got = run(names)
        for name in set(names) & set("abc"):
            assert got[name] == alone[name], (names, name)


def test_seeded_sample_is_independent_of_position():
    # The same seeded request at every row of a batch whose rows carry the same logits samples the same token.
    row = random_logits(1, seed=20)
    requests = [make_request(i, seed=42, temperature=1.0) if i % 2 == 0 else make_request(i) for i in range(6)]
    out = sample(requests, row.expand(6, -1).contiguous()).sampled_token_ids.tolist()
    assert out[0] == out[2] == out[4]


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return (((counts - expected) ** 2) / expected).sum().item()


@pytest.mark.parametrize("seeded", [True, False])
def test_empirical_distribution_matches_softmax(seeded):
    vocab, n = 6, 6000
    logits_row = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -1.0])
    requests = [make_request(i, temperature=1.0, seed=i if seeded else None) for i in range(n)]
    torch.manual_seed(0)
    out = sample(requests, logits_row.expand(n, vocab).contiguous()).sampled_token_ids
    counts = torch.bincount(out, minlength=vocab).double()
    # 5 degrees of freedom: P(chi2 > 25) is about 1e-4.
    assert chi_square(counts, logits_row.double().softmax(-1)) < 25


def test_empirical_distribution_with_temperature_and_top_k():
    vocab, n = 6, 6000
    logits_row = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -1.0])
    requests = [make_request(i, temperature=0.5, top_k=3, seed=1000 + i) for i in range(n)]
    out = sample(requests, logits_row.expand(n, vocab).contiguous()).sampled_token_ids
    counts = torch.bincount(out, minlength=vocab).double()
    kept = [4, 0, 1]
    assert counts.sum() == counts[kept].sum()
    probs = (logits_row[kept].double() / 0.5).softmax(-1)
    assert chi_square(counts[kept], probs) < 20  # 2 degrees of freedom


def test_logprobs_come_from_raw_logits():
    logits = random_logits(3, seed=5)
    requests = [
        make_request(0, temperature=0.0, logprobs=2, logit_bias={0: 50.0}),  # sampled token 0 is not the top one
        make_request(1, temperature=1.0, logprobs=4, presence_penalty=1.0, outputs=[1]),
        make_request(2, temperature=0.0),
    ]
    out = sample(requests, logits)
    assert out.sampled_token_ids[0] == 0
    raw = torch.log_softmax(logits, -1)
    lp = out.logprobs
    assert lp.token_ids.shape == lp.logprobs.shape == (3, 5)
    token_ids, logprobs, ranks = lp.tolists()
    for row in range(3):
        sampled = out.sampled_token_ids[row].item()
        assert token_ids[row][0] == sampled
        assert logprobs[row][0] == pytest.approx(raw[row, sampled].item())
        assert ranks[row] == 1 + (raw[row] > raw[row, sampled]).sum().item()
        top_values, top_ids = raw[row].topk(4)
        assert token_ids[row][1:] == top_ids.tolist()
        torch.testing.assert_close(torch.tensor(logprobs[row][1:]), top_values)
    assert ranks[2] == 1


def test_compute_prompt_logprobs():
    logits = random_logits(5, seed=6)
    targets = torch.tensor([3, 0, 49, 7, 7])
    lp = compute_prompt_logprobs(logits, targets, num_top=3)
    raw = torch.log_softmax(logits, -1)
    assert lp.token_ids[:, 0].tolist() == targets.tolist()
    torch.testing.assert_close(lp.logprobs[:, 0], raw.gather(1, targets[:, None]).squeeze(1))
    assert lp.token_ids[:, 1:].tolist() == raw.topk(3).indices.tolist()
    sorted_ids = raw.argsort(-1, descending=True)
    for row, target in enumerate(targets.tolist()):
        assert lp.ranks[row].item() == sorted_ids[row].tolist().index(target) + 1
    assert compute_prompt_logprobs(logits, targets, num_top=0).token_ids.shape == (5, 1)


def test_bad_words_ban_single_tokens_always_and_a_longer_words_last_token_after_its_prefix():
    logits = torch.zeros(3, VOCAB)
    logits[:, 9] = logits[:, 11] = 5.0  # 9 beats 11 (lower index wins the argmax tie)
    rows = [make_request(i, temperature=0.0, outputs=outputs) for i, outputs in enumerate([[], [3, 4], [4, 3]])]
    for row in rows:
        row.state.sampling_params.bad_words_token_ids = [[2], [3, 4, 9]]
    rows[0].state.sampling_params.bad_words_token_ids = [[9]]
    metadata = SamplingMetadata.from_rows(rows, CPU)
    assert Sampler()(logits, metadata).sampled_token_ids.tolist() == [11, 11, 9]
    assert metadata.min_tokens_mask[1].tolist().count(2) == 2  # the one-token word, on both rows that have it


def test_allowed_token_ids_mask_every_other_token_of_their_rows_only():
    logits = random_logits(2)
    rows = [make_request(0, temperature=0.0, allowed_token_ids=[5, 6]), make_request(1, temperature=0.0)]
    sampled = sample(rows, logits).sampled_token_ids.tolist()
    assert sampled[0] == (5 if logits[0, 5] > logits[0, 6] else 6)
    assert sampled[1] == logits[1].argmax().item()
    with pytest.raises(ValueError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=[])
