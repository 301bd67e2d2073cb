"""Maps requests to KV blocks, with prefix caching over chained block hashes."""

from __future__ import annotations

from dataclasses import dataclass

from tessellm.engine.block_pool import BlockPool
from tessellm.engine.request import Request


@dataclass(slots=True)
class PrefixCacheStats:
    queried_tokens: int = 0
    hit_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


def hash_block(
    parent_hash: int | None, token_ids: tuple[int, ...], extra_key: object = None
) -> int:
    """A full block's identity: the previous block's hash, its tokens, and any extra key."""
    return hash((parent_hash, token_ids, extra_key))


class KVCacheManager:
    """The default paged KV cache manager (``can_allocate`` before ``allocate``)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self.stats = PrefixCacheStats()

    def _update_hashes(self, request: Request, num_tokens: int) -> None:
        bs = self.block_size
        hashes = request.block_hashes
        tokens = request.all_token_ids
        while (len(hashes) + 1) * bs <= num_tokens:
            start = len(hashes) * bs
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block(parent, tuple(tokens[start : start + bs])))

    def get_computed_blocks(self, request: Request) -> int:
        """Attach the longest cached prefix; returns how many tokens need no compute."""
        if not self.enable_prefix_caching or request.block_ids:
            return 0
        # At least one token must be computed to get logits for the next one.
        limit = request.num_tokens - 1
        self._update_hashes(request, request.num_tokens)
        hits: list[int] = []
        for block_hash in request.block_hashes:
            if (len(hits) + 1) * self.block_size > limit:
                break
            block_id = self.pool.lookup(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        self.pool.touch(hits)
        request.block_ids = hits
        num_cached = len(hits) * self.block_size
        self.stats.queried_tokens += request.num_tokens
        self.stats.hit_tokens += num_cached
        return num_cached

    def _blocks_needed(self, request: Request, num_new_tokens: int) -> int:
        total = request.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(request.block_ids))

    def can_allocate(self, request: Request, num_new_tokens: int) -> bool:
        return self._blocks_needed(request, num_new_tokens) <= self.pool.num_free_blocks

    def allocate(self, request: Request, num_new_tokens: int) -> None:
        needed = self._blocks_needed(request, num_new_tokens)
        if needed:
            request.block_ids.extend(self.pool.allocate(needed))
        if self.enable_prefix_caching:
            # Publish blocks that this step fills: their KV is written before any other
            # request of the same step reads it (writes precede attention in every layer).
            end = request.num_computed_tokens + num_new_tokens
            self._update_hashes(request, end)
            first_full = request.num_computed_tokens // self.block_size
            for i in range(first_full, end // self.block_size):
                self.pool.cache(request.block_ids[i], request.block_hashes[i])

    def free(self, request: Request) -> None:
        # Tail blocks first: they are the least likely to be shared by another prompt.
        self.pool.free(list(reversed(request.block_ids)))
        request.block_ids = []

    def usage(self) -> float:
        return self.pool.usage()

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks
