"""Paged KV cache bookkeeping: a pool of fixed-size blocks, ref counts, and automatic prefix caching.

No tensors here: the runner owns the cache memory, this owns which block holds what.
A full block is identified by a hash chained through every block before it, so equal
hashes mean equal prefixes. Blocks whose ref count drops to zero stay in the prefix
cache and in the free list; the least recently freed is evicted first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from scheduler.core.request import Request


@dataclass(eq=False)
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None  # set once the block is full and its content is computed
    # What a cached block holds, for whoever follows the cache's contents (KV events for a router).
    token_ids: tuple[int, ...] = ()
    parent_hash: int | None = None


# What the cache's contents do, in order, for routers that mirror them: a block now cached (its hash, the hash of
# the block before it, its tokens), a cached block evicted, or the whole cache forgotten.
BlockStored = tuple[str, int, int | None, tuple[int, ...]]  # ("stored", hash, parent hash, token ids)
BlockRemoved = tuple[str, int]  # ("removed", hash)
CacheCleared = tuple[str]  # ("cleared",)


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in eviction order: uncached ones first, then cached ones least recently freed.
        self.free_blocks: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self.blocks)
        self.cached_blocks: dict[int, Block] = {}
        self.req_blocks: dict[str, list[Block]] = {}
        self.req_block_ids: dict[str, list[int]] = {}  # the same blocks' ids: the block tables steps read
        self.req_hashes: dict[str, list[int]] = {}  # hashes of the request's full computed blocks
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0
        self.events: list | None = None  # recorded only while someone follows them (see record_events)
        # Which requests' block lists grew or were freed since take_row_changes: the persistent batch's rows
        # follow them (None: nobody follows).
        self._grown: dict[str, None] | None = None
        self._released: list[str] | None = None

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used_blocks(self) -> int:
        """Blocks held by live requests."""
        return self.num_blocks - len(self.free_blocks)

    def block_table(self, request_id: str) -> list[int]:
        """The ids of the blocks the request holds, in order."""
        return list(self.req_block_ids.get(request_id, ()))

    def has_room(self, request: Request, num_tokens: int) -> bool:
        """Whether the blocks the request holds already take num_tokens tokens (allocate would take none)."""
        held = self.req_block_ids.get(request.request_id)
        return held is not None and len(held) * self.block_size >= num_tokens

    def find_cached_prefix(self, request: Request) -> list[Block]:
        """Longest run of leading full blocks already in the cache. At least one token is
        always left to compute, since the step must produce logits for the next one."""
        if not self.enable_prefix_caching:
            return []
        tokens = request.all_token_ids
        max_blocks = (len(tokens) - 1) // self.block_size
        hits, parent = [], None
        for i in range(max_blocks):
            parent = _block_hash(parent, tokens[i * self.block_size:(i + 1) * self.block_size])
            block = self.cached_blocks.get(parent)
            if block is None:
                break
            hits.append(block)
        return hits

    def allocate(self, request: Request, num_tokens: int, cached_prefix: list[Block] = ()) -> bool:
        """Make the request hold enough blocks for num_tokens tokens. On a first allocation,
        cached_prefix (from find_cached_prefix) is shared instead of recomputed. All or nothing."""
        held = self.req_blocks.get(request.request_id)
        num_held = len(held) if held is not None else len(cached_prefix)
        num_new = max(0, -(-num_tokens // self.block_size) - num_held)
        if held is not None and num_new == 0:
            return True  # most steps of a decoding request
        reclaimed = sum(1 for b in cached_prefix if b.ref_cnt == 0) if held is None else 0
        if num_new + reclaimed > len(self.free_blocks):
            return False
        if held is None:
            # Counted per admission (re-admissions after preemption included), not per failed attempt.
            if self.enable_prefix_caching:
                self.prefix_queried_tokens += request.num_tokens
                self.prefix_hit_tokens += len(cached_prefix) * self.block_size
            self.req_blocks[request.request_id] = []
            self.req_block_ids[request.request_id] = []
            self.req_hashes[request.request_id] = [b.block_hash for b in cached_prefix]
            for block in cached_prefix:
                self._take(block)
                self._hold(request.request_id, block)
        for _ in range(num_new):
            block = self._pop_free()
            self._take(block)
            self._hold(request.request_id, block)
        return True

    def grow(self, requests: list[Request], num_blocks: list[int]) -> None:
        """Give each request (each holding blocks already) num_blocks more, all free: the caller counted them
        (allocate, for many requests at once)."""
        assert sum(num_blocks) <= len(self.free_blocks)
        grown = self._grown
        for request, count in zip(requests, num_blocks):
            request_id = request.request_id
            blocks, ids = self.req_blocks[request_id], self.req_block_ids[request_id]
            for _ in range(count):
                block = self._pop_free()
                self._take(block)
                blocks.append(block)
                ids.append(block.block_id)
            if grown is not None:
                grown[request_id] = None

    def fork(self, parent: Request, child: Request, num_blocks: int) -> None:
        """The child holds the parent's first num_blocks blocks too (computed and full), sharing them: one copy of a
        prompt for all its completions. The child computes the rest itself."""
        assert child.request_id not in self.req_blocks
        blocks = self.req_blocks[parent.request_id][:num_blocks]
        for block in blocks:
            self._take(block)
        self.req_blocks[child.request_id] = list(blocks)
        self.req_block_ids[child.request_id] = [b.block_id for b in blocks]
        if self._grown is not None:
            self._grown[child.request_id] = None
        self.req_hashes[child.request_id] = list(self.req_hashes.get(parent.request_id, [])[:num_blocks])

    def num_held_tokens(self, request: Request) -> int:
        """Tokens the blocks a request holds can take (a forked request holds its shared prompt blocks early)."""
        return len(self.req_blocks.get(request.request_id, ())) * self.block_size

    def cache_filled_blocks(self, requests: list[Request]) -> None:
        """cache_full_blocks for each unfinished request, up to the tokens the host knows; a request whose
        blocks stay as they were (most rows of a decode step) costs a comparison."""
        bs, hashes = self.block_size, self.req_hashes
        for request in requests:
            if not request.is_finished:
                num_tokens = min(request.num_computed_tokens, len(request.all_token_ids))
                if num_tokens // bs > len(hashes[request.request_id]):
                    self.cache_full_blocks(request, num_tokens)

    def cache_full_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Register the blocks that computing up to num_computed_tokens has filled."""
        if not self.enable_prefix_caching:
            return
        hashes = self.req_hashes[request.request_id]
        num_full = num_computed_tokens // self.block_size
        if len(hashes) >= num_full:
            return  # most steps of a decoding request: no block filled
        blocks = self.req_blocks[request.request_id]
        tokens = request.all_token_ids
        for i in range(len(hashes), num_full):
            parent = hashes[-1] if hashes else None
            chunk = tuple(tokens[i * self.block_size:(i + 1) * self.block_size])
            block_hash = _block_hash(parent, chunk)
            hashes.append(block_hash)
            block = blocks[i]
            if block.block_hash is None and block_hash not in self.cached_blocks:
                block.block_hash = block_hash
                block.parent_hash = parent
                block.token_ids = chunk
                self.cached_blocks[block_hash] = block
                if self.events is not None:
                    self.events.append(("stored", block_hash, parent, block.token_ids))

    def free(self, request: Request) -> None:
        """Return a request's blocks. Tail blocks go first into the eviction order, so a
        shared prefix outlives the suffixes that hang off it."""
        blocks = self.req_blocks.pop(request.request_id, [])
        if self.req_block_ids.pop(request.request_id, None) is not None and self._released is not None:
            self._released.append(request.request_id)
        self.req_hashes.pop(request.request_id, None)
        for block in reversed(blocks):
            block.ref_cnt -= 1
            assert block.ref_cnt >= 0, f"block {block.block_id} freed twice"
            if block.ref_cnt == 0:
                self.free_blocks[block.block_id] = block
                if block.block_hash is None:
                    self.free_blocks.move_to_end(block.block_id, last=False)

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix; blocks live requests hold stay theirs. Returns how many were forgotten."""
        forgotten = len(self.cached_blocks)
        for block in self.cached_blocks.values():
            block.block_hash = None
        self.cached_blocks.clear()
        if self.events is not None:
            self.events.append(("cleared",))
        # A forgotten block is an uncached one: in the free list, it goes first in the eviction order.
        for block_id in [i for i, b in self.free_blocks.items() if b.block_hash is None]:
            self.free_blocks.move_to_end(block_id, last=False)
        return forgotten

    def _hold(self, request_id: str, block: Block) -> None:
        self.req_blocks[request_id].append(block)
        self.req_block_ids[request_id].append(block.block_id)
        if self._grown is not None:
            self._grown[request_id] = None

    def take_row_changes(self) -> tuple[list[str], list[str]]:
        """(requests whose blocks were freed, requests whose block lists grew) since the last call, in order; the
        first call starts following them. What InputBatch.sync applies."""
        if self._grown is None:
            self._grown, self._released = {}, []
            return [], list(self.req_block_ids)
        released, grown = self._released, list(self._grown)
        self._released, self._grown = [], {}
        return released, grown

    def _take(self, block: Block) -> None:
        if block.ref_cnt == 0:
            del self.free_blocks[block.block_id]
        block.ref_cnt += 1

    def _pop_free(self) -> Block:
        block = next(iter(self.free_blocks.values()))
        if block.block_hash is not None:
            del self.cached_blocks[block.block_hash]
            if self.events is not None:
                self.events.append(("removed", block.block_hash))
            block.block_hash = None
        return block

    def record_events(self, on: bool) -> None:
        """Start (or stop) recording what the cache does, from now on (see cached_contents for what it holds)."""
        self.events = [] if on else None

    def cached_contents(self) -> list[BlockStored]:
        """The cache's contents as stored events, each block after the one before it, so a follower that starts
        from them (and the events recorded after) misses nothing."""
        return [("stored", h, b.parent_hash, b.token_ids) for h, b in self.cached_blocks.items()]

    def take_events(self) -> list:
        """The events recorded since the last call."""
        events, self.events = self.events, ([] if self.events is not None else None)
        return events or []


def _block_hash(parent: int | None, tokens: list[int] | tuple[int, ...]) -> int:
    return hash((parent, tuple(tokens)))  # tuple() of a tuple is the tuple itself: no copy
