"""Paged attention over a mixed verify step padded as a CUDA graph needs it (`InputBatch.fill` with a verify graph:
each sequence padded to 1 + k queries after its own, its seq_len counting them): every real query attends as in
the unpadded step, in the Triton kernel (the interpreter on the CPU) and in the torch reference."""

import pytest
import torch

from engine.kernels import attention, reference
from tests.kernels.test_kernels import ATTENTION_TOL, CUDA, DEVICE, INTERPRET, assert_close

if not CUDA and not INTERPRET:
    pytest.skip("no CUDA device and TRITON_INTERPRET is not set (see conftest.py)", allow_module_level=True)

QUERY_LEN = 4  # 1 + k, k = 3
CONTEXTS = [9, 30, 0, 17, 44]  # tokens cached before the step
COUNTS = [4, 1, 3, 2, 1]  # the step's real queries: 3 drafts, a decode, a 3-token prefill, 1 draft, a decode


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_padded_rows_attend_as_unpadded(dtype, num_splits):
    g = torch.Generator(DEVICE).manual_seed(0)
    num_heads, num_kv_heads, head_size, block_size = 4, 2, 16, 8
    blocks_per_seq = -(-(max(CONTEXTS) + QUERY_LEN) // block_size)
    num_blocks = len(CONTEXTS) * blocks_per_seq
    # Random everywhere, the padding's unwritten slots too: what they hold must not reach a real query.
    key_cache, value_cache = (torch.randn(num_blocks, block_size, num_kv_heads, head_size, generator=g, device=DEVICE,
                                          dtype=dtype) for _ in range(2))
    block_tables = torch.randperm(num_blocks, generator=g, device=DEVICE).to(torch.int32).view(len(CONTEXTS), -1)
    real = torch.randn(sum(COUNTS), num_heads, head_size, generator=g, device=DEVICE, dtype=dtype)
    padded = torch.randn(len(COUNTS) * QUERY_LEN, num_heads, head_size, generator=g, device=DEVICE, dtype=dtype)
    starts = torch.tensor([0, *COUNTS], device=DEVICE).cumsum(0)
    rows = torch.cat([torch.arange(i * QUERY_LEN, i * QUERY_LEN + n, device=DEVICE) for i, n in enumerate(COUNTS)])
    padded[rows] = real
    unpadded_batch = dict(block_tables=block_tables, seq_lens=torch.tensor(
        [c + n for c, n in zip(CONTEXTS, COUNTS)], dtype=torch.int32, device=DEVICE),
        query_start_loc=starts.to(torch.int32))
    padded_batch = dict(block_tables=block_tables, seq_lens=torch.tensor(
        [c + QUERY_LEN for c in CONTEXTS], dtype=torch.int32, device=DEVICE),
        query_start_loc=torch.arange(0, len(COUNTS) * QUERY_LEN + 1, QUERY_LEN, dtype=torch.int32, device=DEVICE))
    expected = reference.paged_attention(real, key_cache, value_cache, **unpadded_batch, scale=0.25)
    for impl, options in ((reference.paged_attention, {}), (attention._paged_attention, {"num_splits": num_splits})):
        out = impl(padded, key_cache, value_cache, **padded_batch, scale=0.25, **options)
        assert_close(out[rows], expected, ATTENTION_TOL)
        unpadded = impl(real, key_cache, value_cache, **unpadded_batch, scale=0.25, **options)
        assert_close(out[rows], unpadded, ATTENTION_TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_a_mixed_graphs_empty_sequences_and_spare_tokens_leave_the_real_rows_alone(dtype, num_splits):
    """A mixed graph's padding (`InputBatch.fill` with `pad_tokens`): sequences with no queries after the real ones,
    and tokens past the last sequence's queries; the real rows attend as unpadded, the spare rows stay as they were."""
    g = torch.Generator(DEVICE).manual_seed(1)
    num_heads, num_kv_heads, head_size, block_size = 4, 2, 16, 8
    counts, contexts, num_empty, num_spare = [1, 6, 1], [12, 0, 25], 3, 7
    num_blocks = len(counts) * 4
    key_cache, value_cache = (torch.randn(num_blocks, block_size, num_kv_heads, head_size, generator=g, device=DEVICE,
                                          dtype=dtype) for _ in range(2))
    tables = torch.randperm(num_blocks, generator=g, device=DEVICE).to(torch.int32).view(len(counts), -1)
    num_real = sum(counts)
    query = torch.randn(num_real + num_spare, num_heads, head_size, generator=g, device=DEVICE, dtype=dtype)
    starts = torch.tensor([0, *counts], device=DEVICE).cumsum(0).to(torch.int32)
    seq_lens = torch.tensor([c + n for c, n in zip(contexts, counts)], dtype=torch.int32, device=DEVICE)
    expected = reference.paged_attention(query[:num_real], key_cache, value_cache, tables, seq_lens, starts, 0.25)
    padded = dict(block_tables=torch.cat([tables, tables[:1].expand(num_empty, -1)]),
                  seq_lens=torch.cat([seq_lens, seq_lens.new_zeros(num_empty)]),
                  query_start_loc=torch.cat([starts, starts[-1:].expand(num_empty)]))
    for impl, options in ((reference.paged_attention, {}), (attention._paged_attention, {"num_splits": num_splits})):
        out = torch.full_like(query, 7.0)
        impl(query, key_cache, value_cache, **padded, scale=0.25, out=out, **options)
        assert_close(out[:num_real], expected, ATTENTION_TOL)
        assert bool((out[num_real:] == 7.0).all())
