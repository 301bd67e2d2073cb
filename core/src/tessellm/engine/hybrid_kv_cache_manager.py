"""The KV cache manager for layouts with several KV groups, windowed groups or recurrent
state (``engine/cache_layout.py``).

Every group keeps its own block table per request (group 0's is ``Request.block_ids``, the
others are ``Request.group_block_ids``), all drawing pages from one pool. A windowed
group's pages that lie wholly before the window of the next query go back to the pool
when the request is next allocated for (they keep their prefix-cache hash, so they may
still be hits until evicted); their table entries then point at a null page that no
request owns and no step writes, which attention never reads (it is outside the window).

Prefix caching: a page is published under its block hash and its group, so two groups
never share a page. A hit of ``P`` blocks needs the first ``P`` blocks of each full group
and, of each windowed group, the blocks the window before position ``P * block_size``
covers; the longest such ``P`` wins. Models with recurrent layers have no prefix cache (a
state at a block boundary is not kept), and each running request holds a state slot; the
samples of an ``n > 1`` request are forked from the one that computes the prompt instead
(``fork``, ``engine/sample_fork.py``).
"""

from __future__ import annotations

from tessellm.engine.cache_layout import CacheLayout, window_blocks
from tessellm.engine.kv_cache_manager import KVCacheManager
from tessellm.interfaces.request import Request


class HybridKVCacheManager(KVCacheManager):
    """``num_blocks`` pages shared by the layout's groups (one of them the null page).

    ``self.num_blocks`` (what the scheduler reads as its capacity) is the pages a lone
    request's group-0 table can grow to once every other group holds its most."""

    supports_schedule_ahead = True
    supports_cache_layouts = True

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        *,
        layout: CacheLayout,
    ) -> None:
        caching = enable_prefix_caching and not layout.has_state
        null = 1 if layout.frees_blocks else 0
        super().__init__(num_blocks - null, block_size, caching)
        self.layout = layout
        self.windows = [g.window for g in layout.groups]
        # The pool hands out ids 0 .. num_blocks - 2; the last page is the null page.
        self.null_block = num_blocks - 1 if null else -1
        others = sum(window_blocks(w, block_size) if w is not None else 0 for w in self.windows[1:])
        full_groups = sum(w is None for w in self.windows) or 1
        self.num_blocks = max(1, (num_blocks - null - others) // full_groups)
        self.free_slots = list(range(layout.num_state_slots - 1, -1, -1))
        # Without a prefix cache for its state, a sample of an n > 1 request is forked from
        # its leader (the scheduler asks; a test sets it False for the recompute path).
        self.supports_sample_forks = layout.has_state
        # request id -> per group, the first table index not yet freed (windowed groups)
        self._live_from: dict[str, list[int]] = {}

    # -- tables ----------------------------------------------------------------------------
    def _tables(self, request: Request) -> list[list[int]]:
        if len(request.group_block_ids) != len(self.windows) - 1:
            request.group_block_ids = [[] for _ in self.windows[1:]]
        return [request.block_ids, *request.group_block_ids]

    @staticmethod
    def _key(group: int, block_hash: bytes) -> bytes:
        return block_hash if group == 0 else block_hash + bytes([group])

    def _first_needed(self, window: int | None, num_computed: int) -> int:
        """The first block a query at ``num_computed`` (or later) reads."""
        if window is None:
            return 0
        return max(0, num_computed - window + 1) // self.block_size

    def _freeable(self, request: Request, tables: list[list[int]]) -> list[tuple[int, int]]:
        """(group, index) of the blocks no later query of ``request`` reads."""
        out = []
        live = self._live_from.get(request.request_id)
        for g, window in enumerate(self.windows):
            if window is None:
                continue
            start = live[g] if live else 0
            end = min(self._first_needed(window, request.num_computed_tokens), len(tables[g]))
            out.extend((g, i) for i in range(start, end) if tables[g][i] != self.null_block)
        return out

    # -- the seam ----------------------------------------------------------------------------
    def get_computed_blocks(self, request: Request) -> int:
        if not self.enable_prefix_caching or request.block_ids:
            return 0
        bs = self.block_size
        max_blocks = (request.num_tokens - 1) // bs
        self._update_hashes(request, max_blocks * bs)
        hashes = request.block_hashes[:max_blocks]
        found = [
            [self.pool.lookup(self._key(g, h)) for h in hashes] for g in range(len(self.windows))
        ]
        hits = 0
        for hits in range(max_blocks, -1, -1):
            if all(
                None not in found[g][self._first_needed(w, hits * bs) : hits]
                for g, w in enumerate(self.windows)
            ):
                break
        tables = self._tables(request)
        live = []
        for g, window in enumerate(self.windows):
            first = self._first_needed(window, hits * bs) if window is not None else 0
            ids = [b for b in found[g][first:hits] if b is not None]
            self.pool.touch(ids)
            tables[g][:] = [self.null_block] * first + ids
            live.append(first)
        self._live_from[request.request_id] = live
        return hits * bs

    def can_allocate(self, request: Request, num_new_tokens: int) -> bool:
        if self.layout.has_state and request.state_slot < 0 and not self.free_slots:
            return False
        tables = self._tables(request)
        blocks = -(-(request.num_computed_tokens + num_new_tokens) // self.block_size)
        needed = sum(max(0, blocks - len(t)) for t in tables)
        if needed <= 0:
            return True
        return needed <= self.pool.num_free_blocks + len(self._freeable(request, tables))

    def allocate(self, request: Request, num_new_tokens: int) -> None:
        if self.layout.has_state and request.state_slot < 0:
            request.state_slot = self.free_slots.pop()
        tables = self._tables(request)
        bs = self.block_size
        start = request.num_computed_tokens
        end = start + num_new_tokens
        freeable = self._freeable(request, tables)
        if freeable:
            self.pool.free(tables[g][i] for g, i in freeable)
            for g, i in freeable:
                tables[g][i] = self.null_block
        live = self._live_from.setdefault(request.request_id, [0] * len(tables))
        for g, window in enumerate(self.windows):
            if window is not None:
                live[g] = max(live[g], min(self._first_needed(window, start), len(tables[g])))
        blocks = -(-end // bs)
        for table in tables:
            if blocks > len(table):
                table.extend(self.pool.allocate(blocks - len(table)))
        if not self.enable_prefix_caching:
            return
        for i in self._blocks_to_publish(request, start, end):
            for g, table in enumerate(tables):
                if table[i] != self.null_block:
                    self.pool.cache(table[i], self._key(g, request.block_hashes[i]))

    def fork(self, leader: Request, sample: Request) -> bool:
        """Give ``sample`` (nothing computed) what ``leader`` holds once this step computes
        its prompt: a state slot, the leader's full blocks (one more reference each) and a
        fresh block for a last partial one, per group; the runner copies the leader's slot
        and partial blocks into these after the step's forward. False, holding nothing,
        where no slot or too few blocks are free (the sample then computes the prompt)."""
        if not self.free_slots:
            return False
        tables = self._tables(leader)
        full, partial = divmod(leader.num_prompt_tokens, self.block_size)
        copied = [g for g, t in enumerate(tables) if partial and len(t) > full]
        if len(copied) > self.pool.num_free_blocks:
            return False
        sample.state_slot = self.free_slots.pop()
        own = self._tables(sample)
        for table, mine in zip(tables, own, strict=True):
            mine[:] = table[:full]
            self.pool.touch(b for b in mine if b != self.null_block)
        for g, block in zip(copied, self.pool.allocate(len(copied)), strict=True):
            own[g].append(block)
        if (live := self._live_from.get(leader.request_id)) is not None:
            self._live_from[sample.request_id] = list(live)
        return True

    def publish_filled(self, request: Request) -> None:
        index = self._unpublished.pop(request.request_id, None)
        tables = self._tables(request)
        if index is None or index >= len(tables[0]):
            return
        self._update_hashes(request, (index + 1) * self.block_size)
        for g, table in enumerate(tables):
            if table[index] != self.null_block:
                self.pool.cache(table[index], self._key(g, request.block_hashes[index]))

    def free(self, request: Request) -> None:
        self._unpublished.pop(request.request_id, None)
        self._live_from.pop(request.request_id, None)
        if request.state_slot >= 0:
            self.free_slots.append(request.state_slot)
            request.state_slot = -1
        written = request.num_computed_tokens // self.block_size
        tables = self._tables(request)
        for table in tables:
            held = [b for b in table if b != self.null_block]
            for block_id in table[written:]:
                if block_id != self.null_block:
                    self.pool.uncache(block_id)
            self.pool.free(reversed(held))
        request.block_ids = []
        request.group_block_ids = []
