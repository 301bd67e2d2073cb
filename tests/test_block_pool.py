"""Block pool and KV cache manager: allocation, freeing, LRU eviction, chained hashes."""

from __future__ import annotations

import pytest

from tessellm.engine.block_pool import BlockPool
from tessellm.engine.kv_cache_manager import KVCacheManager, hash_block
from tessellm.interfaces.request import Request
from tessellm.sampling_params import SamplingParams


def make_request(request_id: str, tokens: list[int], **kwargs) -> Request:
    return Request(request_id, tokens, SamplingParams(max_tokens=8), **kwargs)


def test_allocate_and_free_counts():
    pool = BlockPool(4)
    ids = pool.allocate(3)
    assert len(set(ids)) == 3
    assert pool.num_free_blocks == 1
    assert pool.usage() == pytest.approx(0.75)
    assert all(pool.blocks[i].ref_count == 1 for i in ids)
    with pytest.raises(RuntimeError, match="asked for 2 blocks, 1 free"):
        pool.allocate(2)
    pool.free(ids)
    assert pool.num_free_blocks == 4
    assert pool.usage() == 0.0


def test_double_free_is_an_error():
    pool = BlockPool(2)
    (block,) = pool.allocate(1)
    pool.free([block])
    with pytest.raises(RuntimeError, match="freed twice"):
        pool.free([block])


def test_shared_block_returns_to_pool_after_last_owner():
    pool = BlockPool(2)
    (block,) = pool.allocate(1)
    pool.cache(block, b"h")
    pool.touch([block])  # a second owner through a prefix hit
    pool.free([block])
    assert not pool.is_free(block)
    pool.free([block])
    assert pool.is_free(block)
    assert pool.lookup(b"h") == block  # freed but still cached


def test_cached_blocks_are_evicted_least_recently_freed_first():
    pool = BlockPool(3)
    a, b, c = pool.allocate(3)
    for block, key in ((a, b"a"), (b, b"b"), (c, b"c")):
        pool.cache(block, key)
    pool.free([b])
    pool.free([a])
    pool.free([c])
    # Taking one back (a hit) moves nothing else; the next allocation evicts b (oldest free).
    pool.touch([a])
    (fresh,) = pool.allocate(1)
    assert fresh == b
    assert pool.lookup(b"b") is None
    assert pool.lookup(b"c") == c
    assert pool.num_evictions == 1


def test_first_publisher_keeps_the_hash():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.cache(a, b"same")
    pool.cache(b, b"same")
    assert pool.lookup(b"same") == a
    assert pool.blocks[b].block_hash is None
    pool.free([a, b])
    pool.allocate(1)  # evicts a, the least recently freed
    assert pool.lookup(b"same") is None


def test_caching_disabled_never_hits():
    pool = BlockPool(2, enable_caching=False)
    (block,) = pool.allocate(1)
    pool.cache(block, b"h")
    assert pool.lookup(b"h") is None


def test_hash_chains_over_parent_tokens_and_extra_key():
    root = hash_block(None, [1, 2, 3, 4])
    assert root == hash_block(None, [1, 2, 3, 4])
    assert root != hash_block(None, [1, 2, 3, 5])
    child = hash_block(root, [5, 6, 7, 8])
    assert child != hash_block(hash_block(None, [9, 9, 9, 9]), [5, 6, 7, 8])
    assert root != hash_block(None, [1, 2, 3, 4], b"lora-a")
    assert hash_block(None, [1, 2, 3, 4], b"lora-a") != hash_block(None, [1, 2, 3, 4], b"lora-b")


def test_manager_prefix_hits_skip_full_blocks_only():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    first = make_request("a", list(range(10)))
    assert kv.get_computed_blocks(first) == 0
    kv.allocate(first, 10)
    first.num_computed_tokens = 10
    assert len(first.block_ids) == 3

    # Same first 8 tokens: two full blocks hit; the partial third block is never shared.
    second = make_request("b", [*range(8), 99, 98, 97])
    assert kv.get_computed_blocks(second) == 8
    assert second.block_ids == first.block_ids[:2]
    assert kv.pool.blocks[first.block_ids[0]].ref_count == 2

    # An identical prompt still computes its last token (logits are needed for sampling).
    same = make_request("c", list(range(8)))
    assert kv.get_computed_blocks(same) == 4


def test_manager_cache_salt_separates_tenants():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    first = make_request("a", list(range(9)), cache_salt="tenant-1")
    kv.get_computed_blocks(first)
    kv.allocate(first, 9)
    first.num_computed_tokens = 9
    assert kv.get_computed_blocks(make_request("b", list(range(9)), cache_salt="tenant-2")) == 0
    assert kv.get_computed_blocks(make_request("c", list(range(9)), cache_salt="tenant-1")) == 8


def test_manager_free_withdraws_blocks_never_computed():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    req = make_request("a", list(range(12)))
    kv.allocate(req, 12)  # publishes three blocks for the step that would fill them
    assert kv.pool.num_cached_blocks() == 3
    req.num_computed_tokens = 4  # ... but only the first block's KV was ever written
    kv.free(req)
    assert kv.pool.num_cached_blocks() == 1
    assert kv.get_computed_blocks(make_request("b", list(range(12)))) == 4


def test_manager_can_allocate_counts_only_missing_blocks():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    req = make_request("a", list(range(6)))
    assert kv.can_allocate(req, 6)
    kv.allocate(req, 6)
    req.num_computed_tokens = 6
    assert kv.num_free_blocks == 1
    assert kv.can_allocate(req, 2)  # fits the partial block: no new one needed
    assert kv.can_allocate(req, 6)  # 12 tokens = 3 blocks
    assert not kv.can_allocate(req, 7)
    kv.free(req)
    assert kv.num_free_blocks == 3
    assert req.block_ids == []
