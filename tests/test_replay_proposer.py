"""The bench's replay proposer (the draft-free upper bound of speculation): it proposes from whichever recorded
continuation of a prompt agrees with what was generated, so a continuation that stopped applying at a flipped
near-tie does not end the drafts while another recorded one still applies."""

from bench.replay_proposer import ReplayProposer

PROMPT = [5, 6]


def test_drafts_come_from_the_recorded_continuation_that_still_agrees():
    first = PROMPT + [1, 2, 3, 4, 5, 6]
    second = PROMPT + [1, 2, 9, 8, 7, 6]  # a later pass: flipped at the third token
    proposer = ReplayProposer([[first, second], [[7, 7, 0, 0]]], prompt_len=2)
    assert proposer.propose(PROMPT + [1], 3) == [2, 3, 4]
    assert proposer.propose(PROMPT + [1, 2, 9], 2) == [8, 7]  # only the second one applies here
    assert proposer.propose(PROMPT + [1, 2, 9, 8, 7, 6], 4) == []  # its end
    assert proposer.propose(PROMPT + [3], 4) == []  # no recorded continuation agrees
    assert proposer.propose([7, 7], 4) == [0, 0]
    assert proposer.propose([1, 1], 4) == []  # an unknown prompt
