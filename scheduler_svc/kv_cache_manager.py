"""Which KV blocks each request holds: allocation, prefix-cache hits and publishing, forks.

The scheduler decides who runs; this module keeps every request's block table consistent
with the block pool's reference counts. Two requests only ever share full blocks (a prefix
hit, or the prompt blocks of parallel samples), and nobody writes a full block again, so
sharing needs no copy; the one partial block a forked sample starts from is copied by the
worker (copy-on-write) before the sample writes into it.
"""

from __future__ import annotations

from scheduler_svc.block_pool import BlockPool
from scheduler_svc.prefix_cache import ExtraKeys, extend_block_hashes
from scheduler_svc.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def skips_cache(req: Request) -> bool:
    """Whether `req` must not read the prefix cache: it still has prompt logprobs to compute (they
    go out with its first output). vLLM skips the cache for such requests too. Its blocks are
    still published, for others to hit."""
    return req.sampling.prompt_logprobs is not None and not req.output_token_ids


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool, extra_keys: ExtraKeys) -> None:
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.extra_keys = extra_keys
        # Totals in tokens, vLLM's prefix_cache_queries / prefix_cache_hits.
        self.num_queries = 0
        self.num_hits = 0

    def cached_prefix(self, req: Request) -> list[int]:
        """The cached blocks of `req`'s longest cached prefix of full blocks (no side effect).

        At least the last known token is left out, so the request computes something and
        samples its next token from it. A request asking for prompt logprobs gets no hit (vLLM's
        answer): the worker computes them from the logits of every prompt position.
        """
        if not self.enable_caching or skips_cache(req):
            return []
        max_blocks = (req.num_tokens - 1) // self.block_size
        if len(req.block_hashes) < max_blocks:
            extend_block_hashes(req.block_hashes, req.all_token_ids, self.block_size, self.extra_keys)
        hits = []
        for h in req.block_hashes[:max_blocks]:
            b = self.pool.lookup(h)
            if b is None:
                break
            hits.append(b)
        return hits

    def allocate_slots(self, req: Request, num_new: int, hits: list[int] | None = None) -> list[int] | None:
        """Give `req` the blocks its next `num_new` tokens need; None if too few are free.

        `hits` (a waiting request being admitted) are cached blocks it takes as its first
        blocks, counted as computed. Returns the newly allocated block ids.
        """
        hits = hits or []
        num_computed = req.num_computed_tokens + len(hits) * self.block_size
        need = cdiv(num_computed + num_new, self.block_size) - len(req.block_ids) - len(hits)
        # Hit blocks that nobody holds sit in the free queue: taking them shrinks it too.
        revived = sum(1 for b in hits if self.pool.ref_counts[b] == 0)
        if need + revived > self.pool.num_free:
            return None
        if hits:
            self.pool.share(hits)
            req.block_ids.extend(hits)
            req.num_computed_tokens = num_computed
            req.num_cached_blocks = len(hits)
        new_blocks = self.pool.allocate(need) if need > 0 else []
        req.block_ids.extend(new_blocks)
        return new_blocks

    def record_lookup(self, req: Request, num_hit_tokens: int) -> None:
        """Count an admission's lookup: all its known tokens queried, `num_hit_tokens` found."""
        req.num_cached_tokens = num_hit_tokens
        if self.enable_caching and not skips_cache(req):
            self.num_queries += req.num_tokens
            self.num_hits += num_hit_tokens

    def cache_full_blocks(self, req: Request, num_computed: int) -> None:
        """Publish `req`'s blocks that are full of known tokens once `num_computed` are computed.

        Called as soon as tokens are scheduled, so a request admitted later in the same step
        can already hit them: the worker runs steps in order and, within a step, each layer
        writes every token's K/V before any token reads the cache.
        """
        if not self.enable_caching:
            return
        num_full = min(num_computed, req.num_tokens) // self.block_size
        if num_full <= req.num_cached_blocks:
            return
        if len(req.block_hashes) < num_full:
            extend_block_hashes(req.block_hashes, req.all_token_ids, self.block_size, self.extra_keys)
        for i in range(req.num_cached_blocks, num_full):
            self.pool.cache_block(req.block_ids[i], req.block_hashes[i])
        req.num_cached_blocks = num_full

    def fork(self, leader: Request, sample: Request) -> tuple[int, int] | None:
        """Start parallel sample `sample` from `leader`'s computed prompt (one block must be free).

        The sample shares the prompt's full blocks before its last token, gets one block of
        its own for the block holding the last prompt token, and computes only that token.
        Returns the (source, destination) block copy the worker must do first, if that block
        already holds earlier prompt tokens.
        """
        num_prompt = sample.num_prompt_tokens
        num_shared = (num_prompt - 1) // self.block_size
        shared = leader.block_ids[:num_shared]
        self.pool.share(shared)
        (own,) = self.pool.allocate(1)
        sample.block_ids = [*shared, own]
        sample.num_computed_tokens = num_prompt - 1
        sample.block_hashes = leader.block_hashes[:num_shared]
        sample.num_cached_blocks = num_shared  # the leader offered them to the cache already
        if (num_prompt - 1) % self.block_size == 0:
            return None
        return leader.block_ids[num_shared], own

    def free(self, req: Request) -> None:
        self.pool.free(req.block_ids)
        req.block_ids = []
        req.num_cached_blocks = 0

    def reset_prefix_cache(self) -> None:
        self.pool.reset_prefix_cache()
