"""The KV block pool: fixed-size blocks, reference counts and a free list.

The worker's KV cache is `[num_blocks, block_size, kv_heads, head_dim]` per layer; this pool
decides which of those blocks each request's block table holds. Block ids are plain ints so
they travel in `StepPlan` as they are.
"""

from __future__ import annotations

from collections import deque


class NoFreeBlocks(Exception):
    """Raised when an allocation asks for more blocks than are free (a scheduler bug)."""


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by at least one request (vLLM's kv_cache_usage_perc)."""
        return 1.0 - self.num_free / self.num_blocks

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise NoFreeBlocks(f"asked for {n} blocks, {len(self._free)} free")
        ids = [self._free.popleft() for _ in range(n)]
        for b in ids:
            self.ref_counts[b] = 1
        return ids

    def share(self, block_ids: list[int]) -> None:
        """Another block table now holds these blocks too."""
        for b in block_ids:
            if self.ref_counts[b] <= 0:
                raise AssertionError(f"sharing block {b}, which is free")
            self.ref_counts[b] += 1

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference to each block; blocks nobody holds go back to the free list.

        Freed in reverse so a request's tail blocks are reused first and its head blocks,
        the likeliest to be shared as a prefix, stay around longest.
        """
        for b in reversed(block_ids):
            if self.ref_counts[b] <= 0:
                raise AssertionError(f"block {b} freed twice")
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self._free.append(b)
