"""The block pool on its own: reference counts, double frees, and evicting cached blocks nobody holds."""

import pytest

from scheduler_svc.block_pool import BlockPool


def test_block_pool_refcounts_and_double_free():
    pool = BlockPool(4)
    a = pool.allocate(2)
    pool.share(a)
    pool.free(a)
    assert pool.num_free == 2
    pool.free(a)
    assert pool.num_free == 4
    with pytest.raises(AssertionError):
        pool.free(a)


def test_cached_blocks_without_users_are_evicted_least_recently_freed_first():
    pool = BlockPool(3)
    blocks = pool.allocate(3)
    hashes = [bytes([i]) * 32 for i in range(3)]
    for b, h in zip(blocks, hashes):
        assert pool.cache_block(b, h)
    for b in (blocks[0], blocks[2], blocks[1]):
        pool.free([b])
    assert pool.num_free == 3 and all(pool.lookup(h) is not None for h in hashes)
    assert pool.allocate(1) == [blocks[0]] and pool.lookup(hashes[0]) is None
    pool.share([blocks[1]])  # a hit takes the most recently freed block back, uncopied
    assert pool.num_free == 1 and pool.ref_counts[blocks[1]] == 1
    assert pool.allocate(1) == [blocks[2]] and pool.lookup(hashes[2]) is None
    assert pool.lookup(hashes[1]) == blocks[1]
