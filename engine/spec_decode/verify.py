"""The runner's side of speculative decoding: a request with k drafts computes 1 + k positions in one forward (its
last known token, then the drafts) and samples at each; this file makes those sampling rows and turns their results
into the request's accepted drafts and its one sampled token (`Sampler` with draft ids does the rejection
sampling)."""

from __future__ import annotations

import dataclasses
import itertools

import torch

from engine.contract import ModelRunnerOutput
from engine.device import to_device
from engine.input_batch import ScheduledRow


def verification_rows(row: ScheduledRow, last_index: int,
                      device: torch.device) -> tuple[list[tuple[int, ScheduledRow]], list[int]]:
    """The sampling rows of a request verifying its drafts (`last_index`: its last token's index in the batch),
    with the draft each row checks (-1: the bonus position). Row j sees the first j drafts as outputs already
    drawn, so that penalties, min_tokens and bad words sample position j with the output history it would have."""
    state = row.state
    drafts = state.spec_token_ids
    state.generator(device)  # created once, so that every row draws from the request's one seeded stream
    first, last_known = last_index - len(drafts), len(state.token_ids) - 1
    rows = []
    for j in range(len(drafts) + 1):
        if j and state.sampling_params.needs_output_history:  # penalties, bad words: a copy with the drafts
            view = dataclasses.replace(state, token_ids=state.token_ids + drafts[:j], spec_token_ids=[])
            rows.append((first + j, ScheduledRow(view, last_known + j, 1)))
        else:  # only the count of prior outputs matters (min_tokens): the row's position says it
            rows.append((first + j, ScheduledRow(state, last_known + j, 1)))
    return rows, [*drafts, -1]


def stacked_draft_probs(rows: list[ScheduledRow], draft_probs: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The q of each sampling row's draft ([rows, vocab], zeros where a row has no draft or its request is greedy),
    from each request's q ([drafts, vocab]); None when no request has one (greedy or n-gram drafts)."""
    if not draft_probs:
        return None
    targets, sources, seen = [], [], {}
    for i, row in enumerate(rows):
        req_id = row.state.req_id
        if (q := draft_probs.get(req_id)) is not None:
            j = seen[req_id] = seen.get(req_id, -1) + 1
            if j < len(q):  # the last row of a request is its bonus position, which has no draft
                targets.append(i)
                sources.append(q[j])
    first = next(iter(draft_probs.values()))
    stacked = first.new_zeros(len(rows), first.shape[1])
    stacked[to_device(torch.tensor(targets), first.device)] = torch.stack(sources)
    return stacked


def split_verified(output: ModelRunnerOutput, accepted: list[bool]) -> None:
    """Turns an output of one entry per sampling row (a request verifying k drafts has k + 1 consecutive rows)
    into one entry per request, in place: a request's accepted drafts are those before its first rejected one, and
    its sampled token is that row's (the correction), or the bonus row's when all were accepted."""
    rows = output.req_ids
    sampled, logprobs = output.sampled_token_ids, output.logprobs
    output.req_ids, output.sampled_token_ids = [], []
    output.logprobs = [] if logprobs is not None else None
    for req_id, group in itertools.groupby(range(len(rows)), key=rows.__getitem__):
        group = list(group)
        first, num_drafts = group[0], len(group) - 1
        num_accepted = 0
        while num_accepted < num_drafts and accepted[first + num_accepted]:
            num_accepted += 1
        output.req_ids.append(req_id)
        output.sampled_token_ids.append(sampled[first + num_accepted])
        if num_drafts:
            output.spec_token_ids[req_id] = sampled[first:first + num_accepted]
        if logprobs is not None:
            output.logprobs.append(logprobs[first + num_accepted])
            if num_drafts:
                output.spec_logprobs[req_id] = logprobs[first:first + num_accepted]
