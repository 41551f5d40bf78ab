"""The runner's side of the batch: its copy of each request, and the persistent buffers a step's inputs go through.

Owns:
- `RequestStates`: the runner's own record of every request it was sent (tokens, block table, sampling
  parameters, random generator), kept up to date from each step's `SchedulerOutput` diffs (engine.contract). The
  runner never sees the scheduler's `Request` objects, so the same code runs in a worker process.
- `InputBatch`: one flat batch of tokens from many requests (no padding between them): input ids, positions, the
  slot of each token in the KV cache, each request's block table, sequence length and query offset. The buffers are
  allocated once at the largest size the scheduler can produce, so that CUDA graphs can capture them; each step
  writes a prefix of each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from engine.contract import PoolingParams, SchedulerOutput
from engine.models.attention import AttentionMetadata
from engine.sampling_params import SamplingParams


@dataclass
class CachedRequestState:
    req_id: str
    token_ids: list[int]  # prompt, then the outputs the host knows; pending outputs are only on the device
    num_prompt_tokens: int
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int]
    block_ids: list[int]
    seed: int | None
    adapter_id: str | None
    pooling: PoolingParams | None = None
    spec_token_ids: list[int] = field(default_factory=list)  # this step's drafts, after its last known token
    _generator: torch.Generator | None = field(default=None, repr=False)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The request's own random generator (None when unseeded), created on the sampling device on first use.

        Each seeded request owns its generator, so its samples do not depend on which requests share the batch.
        It lives as long as the request, preemptions included, so a resumed request draws what it would have.
        """
        if self.seed is None:
            return None
        if self._generator is None:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
        return self._generator


class ScheduledRow(NamedTuple):
    """One request's part of a step: positions `start` ... `start + count - 1`."""

    state: CachedRequestState
    start: int
    count: int

    @property
    def samples(self) -> bool:
        """The step reaches the request's last token (known, or pending on the device), so its logits give the
        next one."""
        return self.start + self.count >= len(self.state.token_ids)

    @property
    def num_prior_outputs(self) -> int:
        """Outputs drawn before the one this step samples, pending ones included."""
        return self.start + self.count - self.state.num_prompt_tokens


class RequestStates:
    def __init__(self):
        self.states: dict[str, CachedRequestState] = {}
        self._drafted: list[CachedRequestState] = []  # those with drafts in the latest step

    def apply(self, out: SchedulerOutput) -> list[ScheduledRow]:
        """Brings the runner's copies up to date with one step; returns the step's rows in batch order."""
        states = self.states
        for req_id in out.finished_ids:
            states.pop(req_id, None)
        for req_id in out.preempted_ids:
            if (state := states.get(req_id)) is not None:
                state.block_ids = []  # freed; a resumed request sends its new table
        rows = []
        cached = out.cached_requests
        for i, req_id in enumerate(cached.req_ids):
            state = states[req_id]
            state.token_ids.extend(cached.new_token_ids[i])
            if cached.resumed[i]:
                state.block_ids = list(cached.new_block_ids[i])
            else:
                state.block_ids.extend(cached.new_block_ids[i])
            rows.append(ScheduledRow(state, cached.num_computed_tokens[i], cached.num_new_tokens[i]))
        for new in out.new_requests:
            state = states[new.req_id] = CachedRequestState(
                new.req_id, list(new.token_ids), new.num_prompt_tokens, new.sampling_params,
                frozenset(new.eos_token_ids), list(new.block_ids), new.seed, new.adapter_id, new.pooling)
            rows.append(ScheduledRow(state, new.num_computed_tokens, new.num_new_tokens))
        if self._drafted or out.spec_token_ids:
            self._set_drafts(out.spec_token_ids)
        return rows

    def _set_drafts(self, spec_token_ids: dict[str, list[int]]) -> None:
        for state in self._drafted:
            state.spec_token_ids = []
        self._drafted = [self.states[req_id] for req_id in spec_token_ids]
        for state in self._drafted:
            state.spec_token_ids = spec_token_ids[state.req_id]


class BatchRow(NamedTuple):
    """What the input buffers need of one request: its tokens to compute, the position of the first, how many, and
    its block table."""

    token_ids: np.ndarray | list[int]
    start: int
    count: int
    block_ids: list[int]


class StagedBuffer:
    """A device tensor with a host twin (pinned on CUDA, so the copy is asynchronous) that each step writes
    through numpy; the device side keeps its address for the life of the runner, as CUDA graphs require."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, pin: bool):
        self._host = torch.zeros(shape, dtype=dtype, pin_memory=pin)
        self.host = self._host.numpy()
        self.device = torch.zeros(shape, dtype=dtype, device=device)

    def copy_to_device(self, n: int) -> torch.Tensor:
        """Copies the first n rows to the device and returns the device view of them."""
        self.device[:n].copy_(self._host[:n], non_blocking=True)
        return self.device[:n]


class InputBatch:
    def __init__(self, max_num_tokens: int, max_num_seqs: int, max_blocks_per_seq: int, block_size: int,
                 device: torch.device, with_lora: bool):
        pin = device.type == "cuda"
        self.device = device
        self.block_size = block_size
        self.input_ids = StagedBuffer((max_num_tokens,), torch.int64, device, pin)
        self.positions = StagedBuffer((max_num_tokens,), torch.int64, device, pin)
        self.slot_mapping = StagedBuffer((max_num_tokens,), torch.int64, device, pin)
        self.seq_lens = StagedBuffer((max_num_seqs,), torch.int32, device, pin)
        self.query_start_loc = StagedBuffer((max_num_seqs + 1,), torch.int32, device, pin)
        self.block_tables = StagedBuffer((max_num_seqs, max_blocks_per_seq), torch.int32, device, pin)
        self.sample_rows = StagedBuffer((max_num_tokens,), torch.int64, device, pin)
        # Async scheduling: the previous step's sampled ids stay on the device and feed this step's pending tokens.
        self.pending_dst = StagedBuffer((max_num_seqs,), torch.int64, device, pin)
        self.pending_src = StagedBuffer((max_num_seqs,), torch.int64, device, pin)
        # Each token's adapter slot on the device (-1: none), with LoRA enabled.
        self.lora_slots = StagedBuffer((max_num_tokens,), torch.int32, device, pin) if with_lora else None
        self._inputs_copied: torch.cuda.Event | None = None

    def fill(self, rows: list[BatchRow], pad_to: int | None = None, lora_slots: list[int] | None = None,
             pending: list[tuple[int, int]] = (), last_sampled: torch.Tensor | None = None,
             pad_query_len: int = 1, pad_tokens: int = 0) -> AttentionMetadata:
        """Writes the step's inputs and queues their copies to the device. `pad_to` adds dummy sequences of
        `pad_query_len` tokens up to that many (CUDA graph buckets), and with `pad_query_len` > 1 (a verify graph)
        pads each row of fewer tokens to that many: its padding follows its own tokens, at the next positions,
        written nowhere (slot -1), and its seq_len counts them, so that its real queries keep their positions and
        causal attention hides the padding from them. `lora_slots`: each row's adapter slot (default none).
        `pending`: (token index, row of `last_sampled`) for tokens whose id is still on the device; token indices
        count the padding (each row of a verify graph takes `pad_query_len` tokens). `pad_tokens` (a mixed graph)
        pads the step instead of its rows: up to that many tokens and `pad_to` sequences (`_write_mixed_padding`)."""
        if self._inputs_copied is not None:
            # The last step's asynchronous copies must have left the pinned buffers before we overwrite them.
            self._inputs_copied.synchronize()
        row_len = pad_query_len if pad_to is not None and not pad_tokens else 1
        num_tokens, max_query_len, max_seq_len = self._write_rows(rows, lora_slots, row_len)
        num_seqs = num_tables = len(rows)
        if pad_tokens:
            num_tokens = self._write_mixed_padding(num_tokens, num_seqs, pad_to, pad_tokens)
            num_seqs = pad_to  # the empty sequences read no block table: theirs are not copied
        elif pad_to is not None and pad_to > num_seqs:
            num_tokens = self._write_padding(num_tokens, num_seqs, pad_to, pad_query_len)
            num_seqs = num_tables = pad_to
        for buffer, n in ((self.input_ids, num_tokens), (self.positions, num_tokens),
                          (self.slot_mapping, num_tokens), (self.seq_lens, num_seqs),
                          (self.query_start_loc, num_seqs + 1), (self.block_tables, num_tables)):
            buffer.copy_to_device(n)
        if self.lora_slots is not None:
            self.lora_slots.copy_to_device(num_tokens)
        if pending:
            self.pending_dst.host[:len(pending)], self.pending_src.host[:len(pending)] = zip(*pending)
            dst = self.pending_dst.copy_to_device(len(pending))
            src = self.pending_src.copy_to_device(len(pending))
            self.input_ids.device.index_copy_(0, dst, last_sampled.index_select(0, src))
        return AttentionMetadata(
            slot_mapping=self.slot_mapping.device[:num_tokens],
            block_tables=self.block_tables.device[:num_seqs],
            seq_lens=self.seq_lens.device[:num_seqs],
            query_start_loc=self.query_start_loc.device[:num_seqs + 1],
            max_query_len=max_query_len,
            max_seq_len=max_seq_len,
        )

    def set_sample_rows(self, sample_rows: list[int]) -> torch.Tensor:
        self.sample_rows.host[:len(sample_rows)] = sample_rows
        return self.sample_rows.copy_to_device(len(sample_rows))

    def mark_copies_queued(self) -> None:
        """Every staged copy of this step is queued; the next step may refill the host buffers once they ran."""
        if self.device.type == "cuda":
            self._inputs_copied = torch.cuda.Event()
            self._inputs_copied.record()

    def _write_rows(self, rows: list[BatchRow], lora_slots: list[int] | None,
                    row_len: int) -> tuple[int, int, int]:
        """Each row's tokens, then padding up to `row_len` tokens for a shorter one; returns the token count, the
        longest query and the longest sequence."""
        bs = self.block_size
        input_ids, positions, slot_mapping = self.input_ids.host, self.positions.host, self.slot_mapping.host
        seq_lens, query_start_loc, block_tables = self.seq_lens.host, self.query_start_loc.host, self.block_tables.host
        t = max_query_len = max_seq_len = 0
        for i, (token_ids, start, count, block_ids) in enumerate(rows):
            end = t + count
            input_ids[t:end] = token_ids
            if count == 1:  # decode: skip numpy's per-call overhead
                positions[t] = start
                slot_mapping[t] = block_ids[start // bs] * bs + start % bs
            else:
                token_positions = np.arange(start, start + count)
                positions[t:end] = token_positions
                table = np.asarray(block_ids, dtype=np.int64)
                slot_mapping[t:end] = table[token_positions // bs] * bs + token_positions % bs
            if count < row_len:
                # Never stored, the padding's keys are read where the table points (past the row's blocks: its
                # last one again, not a stale entry, which may name a block of the start-up profile's cache) and
                # masked for the real queries, which come first; the cache is zeroed at allocation, so what they
                # read is finite and its zero weight cancels it.
                block_tables[i, len(block_ids):-(-(start + row_len) // bs)] = block_ids[-1]
                input_ids[end:t + row_len] = 0
                positions[end:t + row_len] = np.arange(start + count, start + row_len)
                slot_mapping[end:t + row_len] = -1
                count, end = row_len, t + row_len
            block_tables[i, :len(block_ids)] = block_ids
            seq_lens[i] = start + count
            query_start_loc[i + 1] = end
            max_query_len = max(max_query_len, count)
            max_seq_len = max(max_seq_len, start + count)
            if self.lora_slots is not None:
                self.lora_slots.host[t:end] = lora_slots[i] if lora_slots else -1
            t = end
        return t, max_query_len, max_seq_len

    def _write_mixed_padding(self, num_tokens: int, num_seqs: int, pad_to: int, pad_tokens: int) -> int:
        """A mixed graph's padding: sequences up to `pad_to` with no tokens (attention skips them), and tokens up to
        `pad_tokens` in no sequence: ids 0 at position 0, written nowhere, their attention rows left as they are.
        Returns the padded token count."""
        self.input_ids.host[num_tokens:pad_tokens] = 0
        self.positions.host[num_tokens:pad_tokens] = 0
        self.slot_mapping.host[num_tokens:pad_tokens] = -1
        self.seq_lens.host[num_seqs:pad_to] = 0
        self.query_start_loc.host[num_seqs + 1:pad_to + 1] = num_tokens
        if self.lora_slots is not None:
            self.lora_slots.host[num_tokens:pad_tokens] = -1
        return pad_tokens

    def _write_padding(self, num_tokens: int, num_seqs: int, pad_to: int, query_len: int) -> int:
        """Dummy sequences: tokens 0 at positions 0.., written nowhere, reading the first tokens of block 0 (their
        rows' stale ids could be the memory profile's, beyond a smaller final cache). Returns the padded token
        count."""
        end = num_tokens + (pad_to - num_seqs) * query_len
        self.input_ids.host[num_tokens:end] = 0
        self.positions.host[num_tokens:end] = 0 if query_len == 1 else np.arange(end - num_tokens) % query_len
        self.slot_mapping.host[num_tokens:end] = -1
        self.seq_lens.host[num_seqs:pad_to] = query_len
        self.block_tables.host[num_seqs:pad_to, :-(-query_len // self.block_size)] = 0
        self.query_start_loc.host[num_seqs + 1:pad_to + 1] = np.arange(num_tokens + query_len, end + 1, query_len)
        if self.lora_slots is not None:
            self.lora_slots.host[num_tokens:end] = -1
        return end
