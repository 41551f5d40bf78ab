"""Block pool and KV cache manager: exact block ids, reference counts and eviction order."""

import random

import pytest

from engine.kv_cache.block_pool import BlockPool
from engine.kv_cache.manager import KVCacheManager, hash_block, root_hash
from engine.request import Request
from engine.sampling_params import SamplingParams


def make_request(request_id, token_ids, **kwargs):
    return Request(request_id, token_ids, SamplingParams(max_tokens=8), **kwargs)


def test_pool_allocates_in_order_and_frees_to_the_back():
    pool = BlockPool(6)
    a = pool.allocate(2)
    b = pool.allocate(2)
    assert [x.block_id for x in a] == [0, 1]
    assert [x.block_id for x in b] == [2, 3]
    assert pool.num_free_blocks == 2 and pool.usage == pytest.approx(4 / 6)
    pool.free(reversed(a))  # tail first
    assert pool.free_queue_ids() == [4, 5, 1, 0]
    assert [x.block_id for x in pool.allocate(3)] == [4, 5, 1]
    pool.check_integrity()


def test_pool_reference_counts_and_touch():
    pool = BlockPool(3)
    (block,) = pool.allocate(1)
    pool.touch([block])
    assert block.ref_cnt == 2
    pool.free([block])
    assert block.ref_cnt == 1 and pool.num_free_blocks == 2
    pool.free([block])
    assert block.ref_cnt == 0 and pool.free_queue_ids() == [1, 2, 0]
    with pytest.raises(RuntimeError):
        pool.free([block])
    with pytest.raises(RuntimeError):
        pool.allocate(4)
    pool.check_integrity()


def test_cached_block_survives_free_until_evicted():
    pool = BlockPool(2)
    (block,) = pool.allocate(1)
    pool.cache_block(block, b"h0")
    pool.free([block])
    assert pool.lookup(b"h0") is block
    assert pool.num_cached_free_blocks == 1
    assert pool.block_states() == bytes([2, 0])
    pool.touch([block])  # a prefix hit takes it off the free queue
    assert pool.free_queue_ids() == [1] and block.ref_cnt == 1
    pool.free([block])
    assert pool.free_queue_ids() == [1, 0]
    pool.allocate(2)  # reuses block 0 last, evicting its prefix
    assert pool.lookup(b"h0") is None and block.block_hash is None
    pool.check_integrity()


def test_hashes_chain_and_depend_on_salt_and_adapter():
    root = root_hash(None, None)
    assert hash_block(root, [1, 2]) != hash_block(root, [2, 1])
    assert root != root_hash("tenant-a", None) != root_hash(None, "adapter-a")
    assert root_hash("x", None) != root_hash(None, "x")
    assert hash_block(hash_block(root, [1]), [2]) != hash_block(hash_block(root, [2]), [1])


def test_manager_allocates_only_what_tokens_need():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    req = make_request("a", list(range(10)))
    assert kv.allocate_slots(req, 10)
    assert kv.block_ids("a") == [0, 1, 2]
    req.num_computed_tokens = 10
    req.append_output_token(10)
    req.append_output_token(11)  # 12 tokens: still 3 blocks
    assert kv.allocate_slots(req, 2)
    assert kv.block_ids("a") == [0, 1, 2]
    req.num_computed_tokens = 12
    req.append_output_token(12)
    assert kv.allocate_slots(req, 1)
    assert kv.block_ids("a") == [0, 1, 2, 3]
    kv.pool.check_integrity()


def test_manager_refuses_without_side_effects():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    req = make_request("a", list(range(20)))
    assert not kv.allocate_slots(req, 20)
    assert kv.num_free_blocks == 3 and kv.num_blocks_of("a") == 0
    kv.pool.check_integrity()


def test_prefix_cache_hit_shares_blocks_and_leaves_last_token():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    a = make_request("a", list(range(12)))
    assert kv.allocate_slots(a, 12)
    b = make_request("b", list(range(12)))
    hits = kv.find_cached_prefix(b)
    # 12 tokens = 3 full blocks, but the last token must be computed: only 2 blocks are reused.
    assert [blk.block_id for blk in hits] == [0, 1]
    assert kv.allocate_slots(b, 4, hits)
    assert kv.block_ids("b") == [0, 1, 3]
    assert [kv.pool.blocks[i].ref_cnt for i in range(4)] == [2, 2, 1, 1]
    kv.free(a)
    kv.free(b)
    kv.pool.check_integrity()
    # Freed tail first, so the shared prefix blocks are evicted last.
    assert kv.pool.free_queue_ids()[-4:] == [2, 3, 1, 0]
    c = make_request("c", list(range(8)) + [99, 98])
    assert [blk.block_id for blk in kv.find_cached_prefix(c)] == [0, 1]
    d = make_request("d", list(range(8)), cache_salt="other-tenant")
    assert kv.find_cached_prefix(d) == []


def test_prefix_caching_off_never_reuses():
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    a = make_request("a", list(range(12)))
    assert kv.allocate_slots(a, 12)
    assert kv.find_cached_prefix(make_request("b", list(range(12)))) == []


def test_share_prefix_for_samples():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    first = make_request("p/0", list(range(9)))
    assert kv.allocate_slots(first, 9)
    sibling = make_request("p/1", list(range(9)))
    assert kv.share_prefix(first, sibling) == 8
    assert kv.block_ids("p/1") == [0, 1]
    assert kv.pool.blocks[0].ref_cnt == 2 and kv.pool.blocks[2].ref_cnt == 1
    sibling.num_computed_tokens = 8
    assert kv.allocate_slots(sibling, 1)
    assert kv.block_ids("p/1") == [0, 1, 3]
    kv.pool.check_integrity()


def test_kv_waste_with_64_concurrent_requests():
    """The share of allocated KV slots that hold real tokens, 64 requests of random lengths, block size 16."""
    rng = random.Random(0)
    kv = KVCacheManager(num_blocks=20000, block_size=16)
    requests = [make_request(str(i), [rng.randrange(1000) for _ in range(rng.randint(20, 2000))]) for i in range(64)]
    for req in requests:
        assert kv.allocate_slots(req, req.num_tokens)
    used_slots = sum(kv.num_blocks_of(r.request_id) for r in requests) * 16
    real_tokens = sum(r.num_tokens for r in requests)
    utilization = real_tokens / used_slots
    print(f"KV slot utilization with 64 random-length requests: {utilization:.2%}")
    assert utilization >= 0.96
