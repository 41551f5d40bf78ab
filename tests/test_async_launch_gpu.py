"""On CUDA a step's launch only queues work: `ModelRunner.execute` returns while the device is still busy with what
came before, so the engine schedules the next step meanwhile. A host-to-device copy of pageable memory in the launch
synchronizes the stream instead (bert embedding steps kept the H200 52% busy that way); here a ~1 s spin kernel is
queued ahead of the step, and the stream must still be busy when `execute` returns."""

import pytest
import torch

from engine import LLM
from engine.contract import PoolingParams
from engine.pooling.inputs import POOLING_SAMPLING
from engine.sampling_params import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CASES = [("bert", "embed"), ("llama", "embed"), ("llama", "generate")]


@pytest.mark.parametrize("family,task", CASES)
def test_a_steps_launch_does_not_wait_for_the_device(tiny_model, family, task):
    llm = LLM(tiny_model(family), device="cuda", dtype="bfloat16", task=task, num_kv_blocks=64, max_num_seqs=8,
              cuda_graphs=False)
    core = llm.core
    for i in range(2):  # the first round compiles what the step runs; the second is the one launched by hand
        for j, ids in enumerate([[5, 6, 7, 8, 9], [10, 11, 12]]):
            if task == "embed":
                core.add_request(f"{i}-{j}", ids, POOLING_SAMPLING, pooling=PoolingParams())
            else:
                core.add_request(f"{i}-{j}", ids, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
        if i == 0:
            while core.has_unfinished_requests():
                core.step()
    scheduler_output = core.scheduler.schedule()
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # ~1 s of one thread spinning on the device, ahead of the step's kernels
    pending = core.runner.execute(scheduler_output)
    busy = not torch.cuda.current_stream().query()
    output = pending.get()
    assert busy, "the step's launch waited for the device"
    assert (len(output.pooled) if task == "embed" else len(output.sampled_token_ids)) == 2
