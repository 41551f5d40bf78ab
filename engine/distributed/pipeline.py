"""A rank's pipeline stage: which of the model's layers it holds, and the activations it takes from the stage before
it and hands to the stage after it.

The first stage embeds the tokens, the last one applies the final norm, computes the logits and samples; every stage
runs the same step on the same batch (each rank gets the step's `SchedulerOutput`), so the activations need no
metadata: the step's hidden states and residual, [num_tokens, hidden] each, go point-to-point on the world group
from rank r to rank r + tensor_parallel_size, the rank of the same tensor-parallel shard in the next stage. They land
in the receiving stage's inbox, two buffers of the largest step's rows allocated once, which its forward reads in
place: so a stage's forward, its communication left outside, replays a CUDA graph as a single rank's does (the
runner receives before the replay and sends after it). Only the step's rows travel (a verify graph's, which pad each
sequence to 1 + k rows, with their padding); a padded graph's rows past them read what an earlier step left, as
padding reads any value.

Several steps are in flight at once (`EngineCore` keeps up to one per stage, vLLM's virtual engines): a stage posts
its activations and goes on to the next step without waiting for the next stage to take them (a gloo send waits for
the receiver; NCCL's runs on its own stream). Every stage runs the steps in the order rank 0 launched them, so a
step's K/V writes at a stage precede any later step's reads there: a request's next prefill chunk, a prefix another
request found cached, or blocks freed by a finished or preempted request and handed to another.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from engine.config import EngineConfig, pipeline_stage_layers


@dataclass(frozen=True)
class PipelineStage:
    layers: range
    index: int = 0
    num_stages: int = 1
    tp_size: int = 1
    # Activations posted to the next stage and not yet taken, with their buffer: the send reads it until then.
    _sends: list[tuple[dist.Work, torch.Tensor]] = field(default_factory=list, compare=False, repr=False)
    # Where the previous stage's hidden states and residual land (`allocate_inbox`), read in place by the forward.
    _inbox: list[torch.Tensor] = field(default_factory=list, compare=False, repr=False)

    @classmethod
    def of(cls, config: EngineConfig, num_layers: int, index: int) -> PipelineStage:
        ranges = pipeline_stage_layers(num_layers, config.pipeline_parallel_size, config.pipeline_layer_split)
        return cls(ranges[index], index, config.pipeline_parallel_size, config.tensor_parallel_size)

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1

    def allocate_inbox(self, max_tokens: int, hidden_size: int, dtype: torch.dtype, device: torch.device) -> None:
        """Every stage but the first: room for the largest step's activations, before anything reads or captures
        them (zeros: a padded graph row reads finite values)."""
        if not self.is_first:
            self._inbox[:] = [torch.zeros((max_tokens, hidden_size), dtype=dtype, device=device) for _ in range(2)]

    def inputs(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The inbox's first `num_tokens` rows of hidden states and residual (a padded graph's rows included)."""
        if num_tokens > self._inbox[0].shape[0]:
            raise ValueError(f"a step of {num_tokens} tokens exceeds the pipeline inbox of {self._inbox[0].shape[0]}")
        return self._inbox[0][:num_tokens], self._inbox[1][:num_tokens]

    def receive(self, num_tokens: int) -> None:
        """The previous stage's hidden states and residual of the step's `num_tokens` rows, into the inbox."""
        for buffer in self.inputs(num_tokens):
            dist.recv(buffer, dist.get_rank() - self.tp_size)

    def send(self, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        """Posts the step's rows to the next stage; the caller leaves both tensors untouched (a graph's output
        buffers are copied first: the next replay would overwrite them before the next stage takes them)."""
        for tensor in (hidden, residual):
            self._post(tensor, dist.get_rank() + self.tp_size)

    def send_to_last(self, tensor: torch.Tensor) -> None:
        """From the first stage to the same shard's rank in the last (a draft model's drafts)."""
        self._post(tensor, dist.get_rank() + (self.num_stages - 1) * self.tp_size)

    def receive_from_first(self, into: torch.Tensor) -> torch.Tensor:
        dist.recv(into, dist.get_rank() - (self.num_stages - 1) * self.tp_size)
        return into

    def _post(self, tensor: torch.Tensor, destination: int) -> None:
        self._sends[:] = [sent for sent in self._sends if not sent[0].is_completed()]
        self._sends.append((dist.isend(tensor, destination), tensor))
