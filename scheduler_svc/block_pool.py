"""The KV block pool: fixed-size blocks, reference counts, a free queue and the prefix cache.

The worker's KV cache is `[num_blocks, block_size, kv_heads, head_dim]` per layer; this pool
decides which of those blocks each request's block table holds. Block ids are plain ints so
they travel in `StepPlan` as they are.

Prefix caching (vLLM v1's design): a full block can carry the hash of its contents (see
`prefix_cache.py`). When its last user frees it, a cached block is not wiped: it joins the
free queue with its hash, and a later request with the same prefix can take it back
(`share`) until an allocation needs a block and evicts it. The free queue is LRU: blocks are
taken from its head and returned to its tail, so the blocks freed longest ago go first.
"""

from __future__ import annotations

from collections import OrderedDict


class NoFreeBlocks(Exception):
    """Raised when an allocation asks for more blocks than are free (a scheduler bug)."""


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        # Blocks nobody holds, least recently freed first; dict keys for O(1) removal when a
        # cached block is hit while in the queue.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> the block that holds those contents

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take now, cached ones with no user included."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by at least one request (vLLM's kv_cache_usage_perc)."""
        return 1.0 - self.num_free / self.num_blocks

    def free_block_ids(self) -> list[int]:
        """The free queue in eviction order (for tests and debugging)."""
        return list(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take `n` blocks from the head of the free queue, evicting their cached contents."""
        if n > len(self._free):
            raise NoFreeBlocks(f"asked for {n} blocks, {len(self._free)} free")
        ids = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            self._evict(b)
            self.ref_counts[b] = 1
            ids.append(b)
        return ids

    def share(self, block_ids: list[int]) -> None:
        """Another block table now holds these blocks too (a prefix hit or a forked sample).

        A block with no user can only be shared while it is still cached: it leaves the free
        queue without being wiped.
        """
        for b in block_ids:
            if self.ref_counts[b] == 0:
                if self.block_hash[b] is None:
                    raise AssertionError(f"sharing block {b}, which is free and not cached")
                del self._free[b]
            self.ref_counts[b] += 1

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference to each block; blocks nobody holds go to the free queue's tail.

        Freed in reverse so a request's tail blocks are evicted first and its head blocks, the
        likeliest to be shared as a prefix, stay cached longest.
        """
        for b in reversed(block_ids):
            if self.ref_counts[b] <= 0:
                raise AssertionError(f"block {b} freed twice")
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self._free[b] = None

    # ---- the prefix cache ------------------------------------------------------------

    def lookup(self, block_hash: bytes) -> int | None:
        """The block holding the contents with this hash, if they are still cached."""
        return self.cached.get(block_hash)

    def cache_block(self, block_id: int, block_hash: bytes) -> bool:
        """Publish a full, held block under its contents' hash; False if already published.

        When two requests computed the same contents, the first block stays the cached one
        and the second is an ordinary block that is reused once freed.
        """
        if self.ref_counts[block_id] <= 0:
            raise AssertionError(f"caching block {block_id}, which nobody holds")
        if block_hash in self.cached or self.block_hash[block_id] is not None:
            return False
        self.cached[block_hash] = block_id
        self.block_hash[block_id] = block_hash
        return True

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (the worker's KV was lost); held blocks stay held."""
        self.cached.clear()
        self.block_hash = [None] * self.num_blocks

    def _evict(self, block_id: int) -> None:
        h = self.block_hash[block_id]
        if h is not None:
            del self.cached[h]
            self.block_hash[block_id] = None
