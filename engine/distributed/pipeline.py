"""A rank's pipeline stage: which of the model's layers it holds, and the activations it takes from the stage before
it and hands to the stage after it.

The first stage embeds the tokens, the last one applies the final norm, computes the logits and samples; every stage
runs the same step on the same batch (each rank gets the step's `SchedulerOutput`), so the activations need no
metadata: one [2, num_tokens, hidden] tensor (hidden states and residual) goes point-to-point on the world group
from rank r to rank r + tensor_parallel_size, the rank of the same tensor-parallel shard in the next stage.

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

    def receive(self, num_tokens: int, hidden_size: int, dtype: torch.dtype,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The previous stage's hidden states and residual, each [num_tokens, hidden]."""
        activations = torch.empty((2, num_tokens, hidden_size), dtype=dtype, device=device)
        dist.recv(activations, dist.get_rank() - self.tp_size)
        return activations[0], activations[1]

    def send(self, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        self._post(torch.stack((hidden, residual)), dist.get_rank() + self.tp_size)

    def send_to_last(self, tensor: torch.Tensor) -> None:
        """From the first stage to the same shard's rank in the last (a draft model's drafts)."""
        self._post(tensor, dist.get_rank() + (self.num_stages - 1) * self.tp_size)

    def receive_from_first(self, into: torch.Tensor) -> torch.Tensor:
        dist.recv(into, dist.get_rank() - (self.num_stages - 1) * self.tp_size)
        return into

    def _post(self, tensor: torch.Tensor, destination: int) -> None:
        self._sends[:] = [sent for sent in self._sends if not sent[0].is_completed()]
        self._sends.append((dist.isend(tensor, destination), tensor))
