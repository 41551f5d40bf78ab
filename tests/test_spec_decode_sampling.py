"""Rejection sampling keeps the target distribution exactly (statistical tests on the sampler, then end to end).

Sampler level: 200,000 requests, each verifying one n-gram draft (q one-hot) and a bonus position, on an 8-token
vocabulary at temperature 0.8 with top-k 6. The first emitted token must follow p1, and the second (emitted only
when the draft was accepted) p2. Each is a chi-square test over the tokens p gives mass to, failing below a p-value
of 1e-4 (the seed is fixed, so the run is deterministic; an unlucky correct sampler would fail one seed in 10,000);
tokens outside the target's support must never appear. Wrong rules fail by far: always accepting the draft, or
resampling from p instead of p minus the draft, moves the first token's frequencies by several percent, which is
hundreds of standard deviations at this sample size (about 0.1 %).
"""

import pytest
import torch

from engine.contract import ModelRunnerOutput
from engine.input_batch import CachedRequestState, ScheduledRow
from engine.sampler import Sampler, SamplingMetadata
from engine.sampling_params import SamplingParams
from engine.spec_decode.verify import split_verified

CPU = torch.device("cpu")
N = 200_000
VOCAB = 8
MIN_P_VALUE = 1e-4


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """P-value of Pearson's chi-square test of `counts` against `probs`; tokens without mass must have no count."""
    support = probs > 0
    assert counts[~support].sum() == 0, "a token outside the target's support was emitted"
    expected = probs[support].double() * counts.sum()
    statistic = ((counts[support].double() - expected) ** 2 / expected).sum()
    df = torch.tensor(support.sum().item() - 1, dtype=torch.float64)
    return torch.special.gammaincc(df / 2, statistic / 2).item()


def target(logits: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    logits = logits / temperature
    kept = logits.topk(top_k).indices
    masked = torch.full_like(logits, float("-inf")).index_copy(0, kept, logits[kept])
    return masked.softmax(-1)


def test_rejection_sampling_keeps_the_target_distribution():
    torch.manual_seed(1234)
    params = SamplingParams(temperature=0.8, top_k=6, max_tokens=10)
    state = CachedRequestState("r", [1, 2, 3], 3, params, frozenset(), [0], None, None)
    rows = [ScheduledRow(state, 2, 1)] * (2 * N)
    logits1, logits2 = torch.randn(VOCAB) * 2, torch.randn(VOCAB) * 2
    p1, p2 = target(logits1, 0.8, 6), target(logits2, 0.8, 6)
    draft = int(p1.argsort()[-2])  # a likely draft, not the likeliest: both paths are taken often
    logits = torch.stack([logits1, logits2]).repeat(N, 1)
    drafts = torch.tensor([draft, -1]).repeat(N)
    sampled = Sampler()(logits, SamplingMetadata.from_rows(rows, CPU), drafts)
    output = ModelRunnerOutput([str(i // 2) for i in range(2 * N)], sampled.sampled_token_ids.tolist())
    split_verified(output, sampled.accepted.tolist())

    firsts, seconds = first_and_second_tokens(output)
    assert 0.1 * N < len(seconds) < 0.9 * N  # both the accepting and the rejecting path were taken
    assert chi_square_p_value(torch.bincount(torch.tensor(firsts), minlength=VOCAB), p1) > MIN_P_VALUE
    assert chi_square_p_value(torch.bincount(torch.tensor(seconds), minlength=VOCAB), p2) > MIN_P_VALUE
    assert abs(len(seconds) / N - p1[draft].item()) < 5 * (0.25 / N) ** 0.5  # acceptance rate is p1(draft)


@pytest.mark.parametrize("always_accept", [True, False])
def test_the_chi_square_test_catches_a_wrong_rule(always_accept):
    """The bound above has power: a sampler that accepts every draft, or resamples a rejected one from p itself,
    fails it."""
    torch.manual_seed(1234)
    logits = torch.randn(VOCAB) * 2
    p = target(logits, 0.8, 6)
    draft = int(p.argsort()[-2])
    accepted = torch.rand(N) < (1.0 if always_accept else p[draft])
    resampled = torch.multinomial(p, N, replacement=True)  # wrong: the draft stays possible
    firsts = torch.where(accepted, draft, resampled)
    assert chi_square_p_value(torch.bincount(firsts, minlength=VOCAB), p) < MIN_P_VALUE


def first_and_second_tokens(output: ModelRunnerOutput) -> tuple[list[int], list[int]]:
    """Per request of one verified draft: its first emitted token (the draft if accepted, else the resampled one)
    and, where the draft was accepted, the second (the bonus token)."""
    firsts, seconds = [], []
    for req_id, token in zip(output.req_ids, output.sampled_token_ids):
        accepted = output.spec_token_ids[req_id]
        firsts.append(accepted[0] if accepted else token)
        if accepted:
            seconds.append(token)
    return firsts, seconds
