"""Fixed-size KV blocks: reference counts, an LRU free queue and the prefix-cache table.

A block whose count drops to zero goes to the back of the free queue but keeps its hash,
so a later request with the same prefix can take it back (a cache hit). Allocation takes
from the front: the least recently freed block is evicted first, and only when a block is
actually needed — cached blocks cost nothing until memory runs short.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

BlockHash = bytes


@dataclass(slots=True)
class KVBlock:
    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Blocks with no owner, least recently freed first (an ordered set).
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[BlockHash, int] = {}
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def usage(self) -> float:
        """Fraction of blocks owned by some request (cached-but-free blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def allocate(self, count: int) -> list[int]:
        """``count`` fresh blocks (reference count 1), evicting cached ones LRU-first."""
        if count > len(self._free):
            raise RuntimeError(f"asked for {count} blocks, {len(self._free)} free")
        ids = []
        for _ in range(count):
            block_id, _ = self._free.popitem(last=False)
            if self.blocks[block_id].block_hash is not None:
                self.uncache(block_id)
                self.num_evictions += 1
            self.blocks[block_id].ref_count = 1
            ids.append(block_id)
        return ids

    def lookup(self, block_hash: BlockHash) -> int | None:
        return self._cached.get(block_hash) if self.enable_caching else None

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take another reference to cached blocks (a prefix hit)."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1

    def cache(self, block_id: int, block_hash: BlockHash) -> None:
        """Publish a full block under its hash. A hash already published keeps its block:
        two requests that computed the same block in the same step share the first copy
        from then on, and the second one is an ordinary block again."""
        if not self.enable_caching:
            return
        block = self.blocks[block_id]
        if block.block_hash is None and block_hash not in self._cached:
            block.block_hash = block_hash
            self._cached[block_hash] = block_id

    def uncache(self, block_id: int) -> None:
        """Withdraw a block from the cache table (evicted, or its KV was never written)."""
        block = self.blocks[block_id]
        if block.block_hash is not None:
            if self._cached.get(block.block_hash) == block_id:
                del self._cached[block.block_hash]
            block.block_hash = None

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference each; ``block_ids`` in eviction order (first evicted first)."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"block {block_id} freed twice")
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None

    def is_free(self, block_id: int) -> bool:
        return block_id in self._free

    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; refused (False) while any block is owned."""
        if self.num_free_blocks != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self._cached.clear()
        return True
