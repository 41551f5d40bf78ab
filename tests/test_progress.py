"""A rank's phases (engine.distributed.progress) and the rule that finds a stuck rank from them: busy in one step
while another rank of its tensor-parallel group has waited for it as long."""

from engine.distributed.progress import BUSY, IDLE, WAITING, Progress, stuck_ranks

LIMIT = 20  # polls


def test_phases_nest_and_every_change_is_a_new_episode():
    progress = Progress()
    assert progress.snapshot() == f"{IDLE}:0"
    with progress.busy():
        assert progress.phase == BUSY
        with progress.waiting():
            assert progress.snapshot() == f"{WAITING}:2"
        assert progress.snapshot() == f"{BUSY}:3"  # busy again, but a new episode: the wait ended
    assert progress.snapshot() == f"{IDLE}:4"
    with progress.waiting():  # a readback after the step: back to idle after it
        pass
    assert progress.phase == IDLE


def seen(**ranks: tuple[str, int]) -> dict[int, tuple[str, int]]:
    return {int(name[1:]): (f"{phase}:7", polls) for name, (phase, polls) in ranks.items()}


def test_a_busy_rank_is_stuck_only_once_its_group_has_waited_for_it_as_long():
    groups = [[0, 1]]
    assert stuck_ranks(groups, seen(r0=(WAITING, LIMIT), r1=(BUSY, LIMIT)), LIMIT) == {1: 0}
    assert stuck_ranks(groups, seen(r0=(BUSY, LIMIT), r1=(WAITING, LIMIT + 5)), LIMIT) == {0: 1}  # rank 0 itself
    assert stuck_ranks(groups, seen(r0=(WAITING, LIMIT - 1), r1=(BUSY, LIMIT)), LIMIT) == {}  # not long enough
    assert stuck_ranks(groups, seen(r0=(WAITING, LIMIT), r1=(BUSY, LIMIT - 1)), LIMIT) == {}  # its episode is new
    assert stuck_ranks(groups, seen(r0=(WAITING, LIMIT), r1=(WAITING, LIMIT)), LIMIT) == {}  # both wait: the device
    assert stuck_ranks(groups, seen(r0=(IDLE, LIMIT), r1=(WAITING, LIMIT)), LIMIT) == {}  # no step: rank 0 idle
    assert stuck_ranks(groups, seen(r0=(BUSY, LIMIT), r1=(BUSY, LIMIT)), LIMIT) == {}  # a long step on both
    assert stuck_ranks(groups, seen(r0=(WAITING, LIMIT)), LIMIT) == {}  # rank 1 not seen yet


def test_only_ranks_of_one_group_judge_each_other():
    """tp=2 x pp=2: a later stage waits for an earlier one's long step (pipeline stages do different work), which
    is not stuck; within a stage's group the rule holds."""
    groups = [[0, 1], [2, 3]]
    assert stuck_ranks(groups, seen(r0=(BUSY, LIMIT), r1=(BUSY, LIMIT), r2=(WAITING, LIMIT), r3=(WAITING, LIMIT)),
                       LIMIT) == {}
    assert stuck_ranks(groups, seen(r0=(IDLE, 0), r1=(IDLE, 0), r2=(WAITING, LIMIT), r3=(BUSY, LIMIT + 1)),
                       LIMIT) == {3: 2}
