"""Scheduler fed with hand-made model outputs: budgets, chunking, preemption, finishing."""

import pytest

from engine.config import EngineConfig
from engine.contract import ModelRunnerOutput
from engine.input_batch import RequestStates
from engine.kv_cache.manager import KVCacheManager
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler

EOS = 999


def make_scheduler(num_blocks=100, block_size=4, prefix_caching=True, max_model_len=64, **config):
    scheduler = Scheduler(EngineConfig(model="unused", max_model_len=max_model_len, **config),
                          KVCacheManager(num_blocks, block_size, prefix_caching))
    scheduler.runner_states = RequestStates()  # the runner's copies, kept from the steps' plain data
    return scheduler


def make_request(request_id, num_prompt, max_tokens=4, priority=0, first_token=0, **params):
    params.setdefault("ignore_eos", False)
    return Request(request_id, list(range(first_token, first_token + num_prompt)),
                   SamplingParams(max_tokens=max_tokens, **params), frozenset({EOS}), priority=priority)


def run_step(scheduler, next_token=7):
    """Schedules one step and answers every sampling request with `next_token` (or a dict id -> token)."""
    out = scheduler.schedule()
    rows = scheduler.runner_states.apply(out)
    sampling = [row.state.req_id for row in rows if row.samples]
    tokens = [next_token[r] if isinstance(next_token, dict) else next_token for r in sampling]
    outputs = scheduler.update_from_output(out, ModelRunnerOutput(sampling, tokens))
    scheduler.kv.pool.check_integrity()
    return out, outputs


def scheduled_tokens(out):
    counts = [*out.cached_requests.num_new_tokens, *(r.num_new_tokens for r in out.new_requests)]
    return dict(zip(out.req_ids(), counts))


def test_prefill_then_decode_in_one_batch():
    s = make_scheduler()
    s.add_request(make_request("a", 10))
    out, outputs = run_step(s)
    assert scheduled_tokens(out) == {"a": 10}
    assert [o.new_token_ids for o in outputs] == [[7]]
    s.add_request(make_request("b", 6, first_token=100))
    out, _ = run_step(s)
    assert scheduled_tokens(out) == {"a": 1, "b": 6}  # a decodes while b prefills, in the same step
    assert s.requests["a"].num_computed_tokens == 11


def test_token_budget_chunks_long_prompts():
    s = make_scheduler(max_num_batched_tokens=8)
    s.add_request(make_request("a", 20))
    s.add_request(make_request("b", 3, first_token=100))
    out, outputs = run_step(s)
    assert scheduled_tokens(out) == {"a": 8}
    assert outputs == []  # a partial prefill samples nothing
    out, _ = run_step(s)
    assert scheduled_tokens(out) == {"a": 8}
    out, outputs = run_step(s)
    assert scheduled_tokens(out) == {"a": 4, "b": 3}
    assert {o.request_id for o in outputs} == {"a", "b"}
    out, _ = run_step(s)
    assert scheduled_tokens(out) == {"a": 1, "b": 1}


def test_max_num_seqs_limits_running():
    s = make_scheduler(max_num_seqs=2)
    for i in range(3):
        s.add_request(make_request(str(i), 4, first_token=10 * i))
    out, _ = run_step(s)
    assert set(scheduled_tokens(out)) == {"0", "1"}
    assert [r.request_id for r in s.waiting] == ["2"]


def test_stop_rules_and_freeing():
    s = make_scheduler()
    s.add_request(make_request("len", 4, max_tokens=2))
    s.add_request(make_request("eos", 4, first_token=10))
    s.add_request(make_request("stop_id", 4, first_token=20, stop_token_ids=[5]))
    s.add_request(make_request("ignore", 4, first_token=30, ignore_eos=True, max_tokens=2))
    run_step(s, {"len": 1, "eos": 1, "stop_id": 1, "ignore": 1})
    _, outputs = run_step(s, {"len": 2, "eos": EOS, "stop_id": 5, "ignore": EOS})
    by_id = {o.request_id: o for o in outputs}
    assert by_id["len"].finish_reason == "length"
    assert by_id["eos"].finish_reason == "stop" and by_id["eos"].stop_reason is None
    assert by_id["stop_id"].finish_reason == "stop" and by_id["stop_id"].stop_reason == 5
    assert by_id["ignore"].finish_reason == "length"
    assert s.num_unfinished == 0 and s.kv.num_free_blocks == 100


def test_min_tokens_defers_eos():
    s = make_scheduler()
    s.add_request(make_request("a", 4, max_tokens=5, min_tokens=2))
    _, outputs = run_step(s, EOS)
    assert outputs[0].finish_reason is None
    _, outputs = run_step(s, EOS)
    assert outputs[0].finish_reason == "stop"


def test_context_length_stops():
    s = make_scheduler(max_model_len=6)
    req = make_request("a", 4, max_tokens=None)
    req.max_tokens = None
    s.add_request(req)
    run_step(s)
    _, outputs = run_step(s)
    assert outputs[0].finish_reason == "length" and s.num_unfinished == 0


def test_preemption_recomputes_and_keeps_tokens():
    # 4 blocks of 4 tokens: two requests of 7 prompt tokens fit (2 blocks each) until one needs a 9th slot.
    s = make_scheduler(num_blocks=4, block_size=4, max_model_len=16, prefix_caching=False)
    s.add_request(make_request("a", 7, max_tokens=5))
    s.add_request(make_request("b", 7, max_tokens=5, first_token=100))
    run_step(s, {"a": 1, "b": 2})  # prefill: 8 tokens known each
    run_step(s, {"a": 1, "b": 2})  # position 7 computed: 9 known, 4 blocks used
    assert s.kv.num_free_blocks == 0
    out, _ = run_step(s, {"a": 1})  # a needs a third block: b (the later arrival) is preempted
    assert out.preempted_ids == ["b"]
    assert scheduled_tokens(out) == {"a": 1}
    b = s.requests["b"]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert b.output_token_ids == [2, 2]
    # a finishes (max_tokens 5) and frees its blocks; b resumes by recomputing all 9 known tokens.
    run_step(s, {"a": 1})
    _, outputs = run_step(s, {"a": 1})
    assert outputs[0].request_id == "a" and outputs[0].finish_reason == "length"
    out, outputs = run_step(s, {"b": 2})
    assert scheduled_tokens(out) == {"b": 9}
    assert outputs[0].new_token_ids == [2] and s.requests["b"].output_token_ids == [2, 2, 2]
    assert s.num_preemptions == 1


def test_preempting_an_already_scheduled_request_returns_its_budget():
    # Priority policy: the victim is the lowest-priority running request, even one already scheduled this step.
    s = make_scheduler(num_blocks=4, block_size=4, max_model_len=16, prefix_caching=False,
                       scheduling_policy="priority")
    s.add_request(make_request("low", 4, max_tokens=8, priority=5))
    run_step(s, {"low": 1})  # low: 5 tokens known, 1 block
    s.add_request(make_request("high", 8, max_tokens=8, priority=0, first_token=100))
    out, _ = run_step(s, {"low": 1, "high": 1})  # high takes 2 blocks, low its second: all 4 used
    assert scheduled_tokens(out) == {"low": 1, "high": 8}
    # Next step: low (first in running order) is scheduled and takes its slot; high needs a 4th block, so low
    # is preempted after being scheduled and its budget goes back.
    out, _ = run_step(s, {"high": 1})
    assert out.preempted_ids == ["low"]
    assert scheduled_tokens(out) == {"high": 1}
    assert s.requests["low"].status == RequestStatus.PREEMPTED


def test_priority_policy_orders_waiting_and_picks_victim():
    s = make_scheduler(max_num_seqs=1, scheduling_policy="priority")
    s.add_request(make_request("late-important", 4, priority=0))
    s.add_request(make_request("unimportant", 4, priority=9, first_token=10))
    s.add_request(make_request("important", 4, priority=0, first_token=20))
    assert [r.request_id for r in s.waiting] == ["late-important", "important", "unimportant"]


def test_fcfs_ignores_priority():
    s = make_scheduler(scheduling_policy="fcfs")
    s.add_request(make_request("first", 4, priority=9))
    s.add_request(make_request("second", 4, priority=0, first_token=10))
    assert [r.request_id for r in s.waiting] == ["first", "second"]


def test_prefix_cache_hit_skips_cached_tokens():
    s = make_scheduler(block_size=4)
    s.add_request(make_request("a", 10, max_tokens=1))
    run_step(s)
    s.add_request(make_request("b", 10, max_tokens=1))
    out, _ = run_step(s)
    # 10 tokens: blocks [0-3] and [4-7] are cached, the last 2 tokens are computed.
    assert scheduled_tokens(out) == {"b": 2}
    assert out.new_requests[0].num_computed_tokens == 8


def test_abort_frees_blocks():
    s = make_scheduler()
    s.add_request(make_request("a", 10))
    s.add_request(make_request("b", 10, first_token=50))
    run_step(s)
    finished = s.finish_requests(["a", "missing"], RequestStatus.FINISHED_ABORTED)
    assert [r.request_id for r in finished] == ["a"]
    assert s.requests.keys() == {"b"}
    s.kv.pool.check_integrity()



def test_prefill_is_capped_while_decodes_run():
    s = make_scheduler(max_num_batched_tokens=64, max_prefill_tokens_while_decoding=8, max_model_len=128)
    s.add_request(make_request("a", 4, max_tokens=20))
    run_step(s)
    s.add_request(make_request("b", 30, first_token=100))
    s.add_request(make_request("c", 5, first_token=200))
    steps = [scheduled_tokens(run_step(s)[0]) for _ in range(5)]
    # a decodes every step; b's prompt and then c's share 8 tokens a step (c's first 2 with b's last 6)
    assert steps == [{"a": 1, "b": 8}, {"a": 1, "b": 8}, {"a": 1, "b": 8}, {"a": 1, "b": 6, "c": 2},
                     {"a": 1, "b": 1, "c": 3}]
    assert s.last_step_num_tokens == 5


@pytest.mark.parametrize(("per_decode", "prefill"), [(4, 12), (0, 8)], ids=["grows", "flat"])
def test_the_prefill_cap_grows_with_the_decoding_streams(per_decode, prefill):
    """Three streams decoding at 4 prompt tokens each allow 12, above the cap of 8; without growth the cap holds."""
    s = make_scheduler(max_num_batched_tokens=64, max_prefill_tokens_while_decoding=8, max_model_len=128,
                       prefill_tokens_per_decode=per_decode)
    for name in "abc":
        s.add_request(make_request(name, 4, max_tokens=20))
    run_step(s)
    s.add_request(make_request("d", 30, first_token=100))
    out, _ = run_step(s)
    assert scheduled_tokens(out) == {"a": 1, "b": 1, "c": 1, "d": prefill}


def test_a_step_without_decodes_prefills_with_the_whole_budget():
    s = make_scheduler(max_num_batched_tokens=64, max_prefill_tokens_while_decoding=8, max_model_len=128)
    s.add_request(make_request("b", 30, first_token=100))
    s.add_request(make_request("c", 5, first_token=200))
    out, _ = run_step(s)
    assert scheduled_tokens(out) == {"b": 30, "c": 5}


@pytest.mark.parametrize("config", [{"max_prefill_tokens_while_decoding": None},
                                    {"max_prefill_tokens_while_decoding": 8, "enable_chunked_prefill": False}],
                         ids=["no-cap", "no-chunking"])
def test_prefill_fills_the_budget_beside_decodes_without_the_cap(config):
    """No cap, or no chunked prefill (a prompt then goes whole or waits): prompts take what the decodes leave."""
    s = make_scheduler(max_num_batched_tokens=128, max_model_len=128, **config)
    s.add_request(make_request("a", 4, max_tokens=20))
    run_step(s)
    s.add_request(make_request("b", 30, first_token=100))
    s.add_request(make_request("c", 5, first_token=200))
    out, _ = run_step(s)
    assert scheduled_tokens(out) == {"a": 1, "b": 30, "c": 5}


def test_decodes_come_before_a_running_prefill():
    """A recompute resumed before a decode in the running order gets only the budget the decodes leave."""
    s = make_scheduler(max_num_batched_tokens=7, max_prefill_tokens_while_decoding=None, max_model_len=128)
    s.add_request(make_request("a", 5, max_tokens=20))
    s.add_request(make_request("b", 2, max_tokens=20, first_token=100))
    run_step(s)
    a = s.requests["a"]
    s.kv.free(a)  # as a preemption does, keeping a first in the running order: all 7 tokens to recompute
    a.num_computed_tokens = 0
    a.resumed = True
    out, _ = run_step(s)
    assert list(scheduled_tokens(out).items()) == [("b", 1), ("a", 6)]  # in running order, b would wait
