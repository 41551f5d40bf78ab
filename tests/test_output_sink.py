"""OutputSink and Generation: a consumer that falls behind gets one update per request that adds up to the steps
it missed, and a failure only after the outputs that came before it."""

import asyncio
from types import SimpleNamespace

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from appliance.engines import EngineDeadError, OutputSink
from appliance.metrics import Metrics
from appliance.openai.generation import Generation
from engine.output_processor import OutputProcessor
from engine.contract import EngineCoreOutput, TokenLogprobs
from engine.sampling_params import SamplingParams

VOCAB = ["<eos>", "the", "cat", "sat", "on", "a", "mat", "STOP", "and", "slept"]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(VOCAB)}, unk_token="<eos>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


def step(request_id: str, index: int, token_id: int, finish_reason: str | None = None,
         n: int = 1) -> EngineCoreOutput:
    logprobs = [TokenLogprobs([token_id, (token_id + 1) % len(VOCAB)], [-0.25 * token_id, -5.0], 1)]
    return EngineCoreOutput(request_id if n == 1 else f"{request_id}/{index}", request_id, index, [token_id],
                            logprobs, finish_reason=finish_reason)


def run_steps(tokenizer, params: SamplingParams, steps: list[list[EngineCoreOutput]],
              take_every_step: bool) -> list[list]:
    """Feeds the steps through an OutputProcessor into a sink, as the engine client's reader does; returns what a
    consumer took, after every step or once at the end."""

    async def main() -> list[list]:
        processor, sink, taken = OutputProcessor(tokenizer), OutputSink(), []
        processor.add_request("r", None, [1, 2], params)
        for outputs in steps:
            request_outputs, _ = processor.process(outputs)
            for output in request_outputs:
                sink.put(0, output)
            if take_every_step:
                taken.append(await sink.take())
        if not take_every_step:
            taken.append(await sink.take())
        return taken

    return asyncio.run(main())


def test_a_late_consumer_gets_the_missed_steps_merged_into_one_update(tokenizer):
    params = SamplingParams(max_tokens=5, logprobs=1, stop=["STOP"])
    steps = [[step("r", 0, t)] for t in (2, 3, 4, 5)] + [[step("r", 0, 6, "length")]]
    per_step = [output for (_, output), in run_steps(tokenizer, params, steps, take_every_step=True)]
    [[(index, merged)]] = run_steps(tokenizer, params, steps, take_every_step=False)

    assert index == 0 and len(per_step) == 5
    (completion,) = merged.outputs
    assert completion.delta_text == "".join(o.outputs[0].delta_text for o in per_step) == " cat sat on a mat"
    assert completion.delta_token_ids == [2, 3, 4, 5, 6]
    assert completion.delta_logprobs == [lp for o in per_step for lp in o.outputs[0].delta_logprobs]
    assert completion.text == per_step[-1].outputs[0].text
    assert completion.finish_reason == "length" and merged.finished


def test_updates_taken_in_time_are_not_changed_by_later_steps(tokenizer):
    params = SamplingParams(max_tokens=3)
    steps = [[step("r", 0, 2)], [step("r", 0, 3)], [step("r", 0, 4, "length")]]
    taken = [output for (_, output), in run_steps(tokenizer, params, steps, take_every_step=True)]
    assert [o.outputs[0].delta_text for o in taken] == [" cat", " sat", " on"]
    assert [o.outputs[0].delta_token_ids for o in taken] == [[2], [3], [4]]
    assert [o.outputs[0].finish_reason for o in taken] == [None, None, "length"]


def test_samples_that_end_at_different_steps_merge_with_both_endings(tokenizer):
    params = SamplingParams(n=2, max_tokens=3, stop=["STOP"])
    steps = [[step("r", 0, 2, n=2), step("r", 1, 3, n=2)],
             [step("r", 0, 7, n=2), step("r", 1, 8, n=2)],  # sample 0 hits its stop string
             [step("r", 1, 9, "length", n=2)]]
    [[(_, merged)]] = run_steps(tokenizer, params, steps, take_every_step=False)
    first, second = merged.outputs
    assert (first.delta_text, first.finish_reason, first.stop_reason) == (" cat ", "stop", "STOP")
    assert (second.delta_text, second.finish_reason) == (" sat and slept", "length")
    assert second.delta_token_ids == [3, 8, 9] and merged.finished


def test_an_error_comes_after_the_outputs_put_before_it(tokenizer):
    async def main():
        processor, sink = OutputProcessor(tokenizer), OutputSink()
        processor.add_request("r", None, [1], SamplingParams(max_tokens=10))
        waiting = asyncio.ensure_future(sink.take())
        await asyncio.sleep(0)  # the consumer is parked on the sink
        for token_id in (2, 3):
            (output,), _ = processor.process([step("r", 0, token_id)])
            sink.put(0, output)
        sink.fail(0, EngineDeadError("gone"))
        return await waiting

    (index, output), (error_index, error) = asyncio.run(main())
    assert index == error_index == 0 and output.outputs[0].delta_text == " cat sat"
    assert isinstance(error, EngineDeadError)


class FakeClient:
    """Just enough of an EngineClient for a Generation: it records where outputs go and what was aborted."""

    name, replica = "model", 0

    def __init__(self):
        self.sink, self.aborted = None, []

    def add_request(self, request_id, prompt, prompt_token_ids, params, sink, index, priority, lora_name,
                    pooling=None, cache_salt=None, kv_parent=None, keep_kv=False):
        self.sink = sink

    def abort(self, request_ids):
        self.aborted += request_ids


def test_a_generation_streams_what_came_before_a_failure_and_releases_each_prompt_once(tokenizer):
    async def main():
        client, released = FakeClient(), []
        generation = Generation(client, "r", [(None, [1]), (None, [1])], SamplingParams(max_tokens=4),
                                metrics=Metrics(SimpleNamespace(models={})), on_done=lambda: released.append(1))
        processor = OutputProcessor(tokenizer)
        processor.add_request("r", None, [1], SamplingParams(max_tokens=4))
        for token_id in (2, 3):
            (output,), _ = processor.process([step("r", 0, token_id)])
            client.sink.put(0, output)
        client.sink.fail(1, EngineDeadError("gone"))
        batches = []
        with pytest.raises(EngineDeadError):
            async for batch in generation.outputs():
                batches.append(batch)
        await generation.aclose()
        await generation.aclose()
        return batches, client.aborted, released

    batches, aborted, released = asyncio.run(main())
    [[(index, output)]] = batches
    assert index == 0 and output.outputs[0].delta_text == " cat sat"
    assert len(aborted) == 2 and len(released) == 2


def test_latency_metrics_count_engine_steps_even_when_the_consumer_takes_them_merged(tokenizer):
    async def main() -> tuple[Metrics, list]:
        client, metrics = FakeClient(), Metrics(SimpleNamespace(models={}))
        params = SamplingParams(max_tokens=4)
        generation = Generation(client, "r", [(None, [1])], params, metrics=metrics, on_done=lambda: None)
        processor = OutputProcessor(tokenizer)
        processor.add_request("r", None, [1], params)
        for token_id, finish in ((2, None), (3, None), (4, None), (5, "length")):
            (output,), _ = processor.process([step("r", 0, token_id, finish)])
            client.sink.put(0, output)
        batches = [batch async for batch in generation.outputs()]
        await generation.aclose()
        return metrics, batches

    metrics, batches = asyncio.run(main())
    [[(_, merged)]] = batches  # the consumer took the four steps as one update
    assert merged.outputs[0].delta_token_ids == [2, 3, 4, 5]

    def sample(name: str) -> float:
        return metrics.registry.get_sample_value(name, {"model_name": "model"})

    assert sample("vllm:inter_token_latency_seconds_count") == 3
    assert sample("vllm:time_to_first_token_seconds_count") == 1
    assert sample("vllm:generation_tokens_total") == 4
    assert metrics.registry.get_sample_value(
        "vllm:request_success_total", {"model_name": "model", "finished_reason": "length"}) == 1
