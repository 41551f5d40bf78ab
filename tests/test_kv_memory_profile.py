"""The profiling step that sizes a GPU's KV cache (`KVMemory._profile_shapes`): its sequences must fit the block
tables the input batch holds, `max_model_len` long at most. A batch-1 engine (max_num_seqs 1) whose max_model_len
is below max_num_batched_tokens once failed to start on the GPU: its one profiled sequence took all the step's
tokens and overflowed its block-table row."""

from types import SimpleNamespace

import pytest

from engine.kv_memory import KVMemory


def profile_shapes(max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int, block_size: int = 16):
    allocated = []
    memory = SimpleNamespace(
        config=SimpleNamespace(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens),
        model_config=SimpleNamespace(max_model_len=max_model_len), block_size=block_size,
        allocate=lambda num_blocks, show_progress: allocated.append(num_blocks))
    lengths, tables = KVMemory._profile_shapes(memory)
    return lengths, tables, allocated[0]


@pytest.mark.parametrize(("max_num_seqs", "max_num_batched_tokens", "max_model_len", "tokens"), [
    (1, 8192, 192, 192),  # one sequence: max_model_len of the step's tokens
    (4, 8192, 1000, 4000),
    (256, 8192, 4096, 8192),  # the usual case: the step's tokens over the sequences
    (64, 32, 4096, 32),  # more sequences than tokens: one token each
])
def test_profiled_sequences_fit_max_model_len(max_num_seqs, max_num_batched_tokens, max_model_len, tokens):
    lengths, tables, allocated = profile_shapes(max_num_seqs, max_num_batched_tokens, max_model_len)
    assert sum(lengths) == tokens
    assert len(lengths) == min(max_num_seqs, max_num_batched_tokens)
    assert max(lengths) <= max_model_len
    max_blocks_per_seq = -(-max_model_len // 16)
    assert all(len(table) == -(-n // 16) <= max_blocks_per_seq for n, table in zip(lengths, tables))
    assert sorted(b for table in tables for b in table) == list(range(allocated))  # blocks of their own
