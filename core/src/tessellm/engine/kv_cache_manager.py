"""Maps requests to KV blocks, with prefix caching over chained block hashes.

A full block is identified by a digest of (its parent block's digest, its token ids, an
optional extra key). The chain makes a block's identity depend on every token before it,
which is what its KV depends on. Digests are BLAKE2b, not Python's ``hash()``: a collision
would hand one request another's KV, so the hash must be hard to collide on purpose.

Blocks are published (made findable) when they are allocated for the step that fills
them: a request admitted later in the same step may take them as hits, because every
attention layer writes the whole batch's KV before any sequence reads it. A block whose
KV was never written (its owner was preempted before the step ran) is withdrawn on free.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

from tessellm.engine.block_pool import BlockHash, BlockPool
from tessellm.interfaces import engine as seams
from tessellm.interfaces.request import Request
from tessellm.multimodal.processor import block_key

# A block whose last token is a placeholder (an output token still being sampled, with
# schedule-ahead) gets its hash, and is published, once the token is filled in.
PLACEHOLDER_TOKEN = seams.PLACEHOLDER_TOKEN


def hash_block(
    parent_hash: BlockHash | None, token_ids: Sequence[int], extra_key: bytes | None = None
) -> BlockHash:
    """A full block's identity: the previous block's hash, its tokens, and any extra key.

    Every field is length-prefixed, so no two different inputs encode to the same bytes.
    """
    digest = hashlib.blake2b(digest_size=16)
    for part in (parent_hash or b"", array("q", token_ids).tobytes(), extra_key or b""):
        digest.update(len(part).to_bytes(4, "little"))
        digest.update(part)
    return digest.digest()


class KVCacheManager(seams.KVCacheManager):
    """The default paged KV cache manager (``can_allocate`` before ``allocate``)."""

    supports_schedule_ahead = True

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        super().__init__(num_blocks, block_size, enable_prefix_caching)
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        # request id -> index of an allocated block that a placeholder token completes
        self._unpublished: dict[str, int] = {}

    def block_extra_key(self, request: Request, block_index: int) -> bytes | None:
        """What besides the tokens changes block ``block_index``'s KV (hook for LoRA,
        multimodal inputs). The chain carries the first block's key to every later block,
        and an image's content hash from the block where the image starts."""
        key = (
            block_key(request.mm_inputs, block_index, self.block_size) if request.mm_inputs else b""
        )
        if block_index != 0:
            return key or None
        if request.cache_salt is not None:
            key += request.cache_salt.encode()
        if request.lora_request is not None:  # an adapter changes every layer's KV
            key += b"\x00lora:%d" % request.lora_request.lora_int_id
        return key or None

    def _update_hashes(self, request: Request, num_tokens: int) -> None:
        bs = self.block_size
        hashes = request.block_hashes
        while (len(hashes) + 1) * bs <= num_tokens:
            index = len(hashes)
            tokens = request.token_slice(index * bs, (index + 1) * bs)
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block(parent, tokens, self.block_extra_key(request, index)))

    def get_computed_blocks(self, request: Request) -> int:
        """Attach the longest cached prefix; returns how many tokens need no compute."""
        if not self.enable_prefix_caching or request.block_ids:
            return 0
        # At least one token must be computed to get logits for the next one.
        max_blocks = (request.num_tokens - 1) // self.block_size
        self._update_hashes(request, max_blocks * self.block_size)
        hits: list[int] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block_id = self.pool.lookup(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        self.pool.touch(hits)
        request.block_ids = hits
        return len(hits) * self.block_size

    # Both below run for every request every step: the common decode step (no new block,
    # no block filled) returns after a few integer operations.
    def can_allocate(self, request: Request, num_new_tokens: int) -> bool:
        total = request.num_computed_tokens + num_new_tokens
        needed = -(-total // self.block_size) - len(request.block_ids)
        return needed <= 0 or needed <= self.pool.num_free_blocks

    def allocate(self, request: Request, num_new_tokens: int) -> None:
        bs = self.block_size
        start = request.num_computed_tokens
        end = start + num_new_tokens
        needed = -(-end // bs) - len(request.block_ids)
        if needed > 0:
            request.block_ids.extend(self.pool.allocate(needed))
        if self.enable_prefix_caching:
            for i in self._blocks_to_publish(request, start, end):
                self.pool.cache(request.block_ids[i], request.block_hashes[i])

    def _blocks_to_publish(self, request: Request, start: int, end: int) -> range:
        """The indices of the full blocks that tokens ``start..end`` complete and whose
        tokens are all known (their hashes computed here). Speculative drafts run past the
        known tokens: no block holding one is published until it is accepted, which the next
        allocation (from the first block not yet hashed) catches up on; a block completed
        by a placeholder waits for ``publish_filled``."""
        bs = self.block_size
        known = min(end, request.num_tokens)
        first = min(start // bs, len(request.block_hashes))
        outputs = request.output_token_ids
        if outputs and outputs[-1] == PLACEHOLDER_TOKEN and known == request.num_tokens:
            known -= 1
            if end % bs == 0:
                self._unpublished[request.request_id] = end // bs - 1
        if (len(request.block_hashes) + 1) * bs <= known:
            self._update_hashes(request, known)
        return range(first, known // bs)

    def publish_filled(self, request: Request) -> None:
        """Publish the block that a placeholder token completed, now that the token is
        known (its KV is written by the step it was allocated for, already launched)."""
        index = self._unpublished.pop(request.request_id, None)
        if index is None or index >= len(request.block_ids):
            return
        self._update_hashes(request, (index + 1) * self.block_size)
        self.pool.cache(request.block_ids[index], request.block_hashes[index])

    def free(self, request: Request) -> None:
        """Release the request's blocks. ``request.num_computed_tokens`` must count only
        tokens whose KV is written: blocks past it leave the cache table."""
        self._unpublished.pop(request.request_id, None)
        blocks = request.block_ids
        for block_id in blocks[request.num_computed_tokens // self.block_size :]:
            self.pool.uncache(block_id)
        # Tail blocks first: they are the least likely to be shared by another prompt.
        self.pool.free(reversed(blocks))
        request.block_ids = []

    def usage(self) -> float:
        return self.pool.usage()

    def reset_prefix_cache(self) -> bool:
        if self._unpublished:
            return False
        return self.pool.reset_prefix_cache()

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks
