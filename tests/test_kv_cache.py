"""BlockPool: all-or-nothing allocation, ref counts, and prefix caching over chained block hashes."""

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.core.kv_cache import BlockPool
from scheduler.core.params import SamplingParams
from scheduler.core.request import Request


def make_request(request_id: str, prompt: list[int]) -> Request:
    return Request(request_id, list(prompt), SamplingParams(max_tokens=1))


def compute(pool: BlockPool, request: Request, num_tokens: int | None = None) -> None:
    """What the engine does after a forward pass over the request's tokens."""
    request.num_computed_tokens = request.num_tokens if num_tokens is None else num_tokens
    pool.cache_full_blocks(request, request.num_computed_tokens)


def admit(pool: BlockPool, request: Request) -> list:
    """What the scheduler and engine do for a new request: share its cached prefix, allocate the rest,
    compute every token. Returns the shared blocks."""
    cached = pool.find_cached_prefix(request)
    assert pool.allocate(request, request.num_tokens, cached)
    compute(pool, request)
    return cached


def num_hit_blocks(pool: BlockPool, prompt: list[int]) -> int:
    return len(pool.find_cached_prefix(make_request("probe", prompt)))


def ref_counts(pool: BlockPool) -> list[int]:
    return [b.ref_cnt for b in pool.blocks]


def assert_pool_consistent(pool: BlockPool) -> None:
    holders = Counter(b.block_id for blocks in pool.req_blocks.values() for b in blocks)
    assert ref_counts(pool) == [holders[i] for i in range(pool.num_blocks)]
    assert all(len(set(map(id, blocks))) == len(blocks) for blocks in pool.req_blocks.values())
    assert set(pool.free_blocks) == {b.block_id for b in pool.blocks if b.ref_cnt == 0}
    assert all(block.block_hash == h for h, block in pool.cached_blocks.items())
    assert {b.block_id for b in pool.blocks if b.block_hash is not None} == \
           {b.block_id for b in pool.cached_blocks.values()}


def assert_all_free(pool: BlockPool) -> None:
    assert pool.num_free_blocks == pool.num_blocks
    assert pool.num_used_blocks == 0
    assert ref_counts(pool) == [0] * pool.num_blocks
    assert pool.req_blocks == {}


@pytest.mark.parametrize("num_tokens", [1, 3, 4, 5, 8, 9, 16])
def test_block_table_holds_ceil_tokens_over_block_size(num_tokens):
    pool = BlockPool(num_blocks=8, block_size=4)
    assert pool.allocate(make_request("a", [0] * num_tokens), num_tokens)
    assert len(pool.block_table("a")) == -(-num_tokens // 4)
    assert pool.num_used_blocks == -(-num_tokens // 4)


def test_growing_a_table_appends_blocks_and_keeps_the_held_ones():
    pool = BlockPool(num_blocks=8, block_size=4)
    request = make_request("a", [0] * 13)
    tables = []
    for num_tokens in (3, 4, 5, 8, 13):
        assert pool.allocate(request, num_tokens)
        tables.append(pool.block_table("a"))
    assert [len(t) for t in tables] == [1, 1, 2, 2, 4]
    for shorter, longer in zip(tables, tables[1:]):
        assert longer[:len(shorter)] == shorter
    assert len(set(tables[-1])) == 4
    assert_pool_consistent(pool)


def test_allocate_is_all_or_nothing_when_blocks_run_short():
    pool = BlockPool(num_blocks=4, block_size=4)
    a, b = make_request("a", [0] * 20), make_request("b", [0] * 8)
    assert pool.allocate(a, 12)
    table_a, refs = pool.block_table("a"), ref_counts(pool)

    assert not pool.allocate(b, 8)  # 2 blocks wanted, 1 free
    assert not pool.allocate(a, 20)  # 2 more blocks wanted, 1 free
    assert pool.block_table("b") == []
    assert "b" not in pool.req_blocks
    assert pool.block_table("a") == table_a
    assert ref_counts(pool) == refs
    assert pool.num_free_blocks == 1

    assert pool.allocate(b, 4)  # an exact fit still succeeds
    assert pool.num_free_blocks == 0
    assert_pool_consistent(pool)


def test_allocate_counts_free_cached_prefix_blocks_against_the_free_ones():
    pool = BlockPool(num_blocks=3, block_size=4)
    a = make_request("a", list(range(9)))
    admit(pool, a)
    pool.free(a)  # its 2 full blocks stay cached, on the free list

    # 2 cached blocks to reclaim from the free list + 2 new ones > 3 free: refused, nothing taken.
    b = make_request("b", list(range(8)) + [20, 21, 22, 23, 24])
    cached = pool.find_cached_prefix(b)
    assert len(cached) == 2
    assert not pool.allocate(b, b.num_tokens, cached)
    assert pool.block_table("b") == []
    assert_all_free(pool)
    assert len(pool.cached_blocks) == 2
    assert num_hit_blocks(pool, list(range(9))) == 2

    c = make_request("c", list(range(8)) + [30])
    cached = pool.find_cached_prefix(c)
    assert pool.allocate(c, c.num_tokens, cached)
    assert pool.block_table("c")[:2] == [blk.block_id for blk in cached]
    assert pool.num_free_blocks == 0
    assert_pool_consistent(pool)


def test_free_returns_every_block_and_ref_counts_reach_zero():
    pool = BlockPool(num_blocks=8, block_size=4)
    a, b = make_request("a", list(range(10))), make_request("b", list(range(100, 107)))
    admit(pool, a)
    admit(pool, b)
    assert pool.num_used_blocks == 3 + 2
    pool.free(a)
    assert pool.num_used_blocks == 2
    assert all(pool.blocks[i].ref_cnt == 1 for i in pool.block_table("b"))
    pool.free(b)
    assert_all_free(pool)
    assert pool.block_table("a") == pool.block_table("b") == []


def test_shared_prompt_prefix_shares_computed_full_blocks():
    pool = BlockPool(num_blocks=8, block_size=4)
    a = make_request("a", list(range(10)))
    assert admit(pool, a) == []
    queried, hit = pool.prefix_queried_tokens, pool.prefix_hit_tokens

    b = make_request("b", list(range(8)) + [50, 51, 52])
    cached = pool.find_cached_prefix(b)
    assert [blk.block_id for blk in cached] == pool.block_table("a")[:2]
    assert (pool.prefix_queried_tokens, pool.prefix_hit_tokens) == (queried, hit)  # counted on admission only

    assert pool.allocate(b, b.num_tokens, cached)
    assert pool.prefix_queried_tokens - queried == 11
    assert pool.prefix_hit_tokens - hit == 8
    table_a, table_b = pool.block_table("a"), pool.block_table("b")
    assert table_b[:2] == table_a[:2]
    assert [pool.blocks[i].ref_cnt for i in table_a] == [2, 2, 1]
    assert table_b[2] not in table_a
    assert pool.num_used_blocks == 3 + 1

    pool.free(a)
    assert [pool.blocks[i].ref_cnt for i in table_b] == [1, 1, 1]
    pool.free(b)
    assert_all_free(pool)


def test_blocks_are_shared_only_once_computed():
    pool = BlockPool(num_blocks=8, block_size=4)
    a = make_request("a", list(range(10)))
    assert pool.allocate(a, a.num_tokens)
    probe = list(range(10))
    assert num_hit_blocks(pool, probe) == 0  # allocated, not computed yet
    compute(pool, a, 5)
    assert num_hit_blocks(pool, probe) == 1  # one full block computed
    compute(pool, a, 10)
    assert num_hit_blocks(pool, probe) == 2  # the third block is partial: never cached


def test_last_prompt_token_is_never_served_from_cache():
    pool = BlockPool(num_blocks=8, block_size=4)
    admit(pool, make_request("a", list(range(8))))
    assert len(pool.cached_blocks) == 2

    assert num_hit_blocks(pool, list(range(8))) == 1  # 2 full blocks cached, only 1 served
    assert num_hit_blocks(pool, list(range(9))) == 2


def test_an_equal_block_after_a_different_prefix_is_not_a_hit():
    pool = BlockPool(num_blocks=8, block_size=2)
    admit(pool, make_request("a", [1, 2, 3, 4, 9]))  # caches [1,2] and [1,2]+[3,4]
    q = make_request("q", [5, 6, 9])
    admit(pool, q)  # caches [5,6]

    # [5,6] hits q's block; [3,4] after [5,6] is new content even though [3,4] after [1,2] is cached.
    b = make_request("b", [5, 6, 3, 4, 9])
    cached = admit(pool, b)
    assert [blk.block_id for blk in cached] == pool.block_table("q")[:1]
    assert pool.block_table("b")[1] not in pool.block_table("a")

    # Now that b computed it, the chain [5,6]+[3,4] is cached, in b's block.
    assert [blk.block_id for blk in pool.find_cached_prefix(make_request("c", [5, 6, 3, 4, 0]))] == \
           pool.block_table("b")[:2]
    assert_pool_consistent(pool)


def test_prefix_caching_off_never_hits():
    pool = BlockPool(num_blocks=8, block_size=4, enable_prefix_caching=False)
    admit(pool, make_request("a", list(range(10))))
    assert num_hit_blocks(pool, list(range(10))) == 0
    assert pool.cached_blocks == {}


def fill_and_free_one_block_each(pool: BlockPool, prompts: list[list[int]], free_order: list[int]) -> None:
    requests = [make_request(f"r{i}", p) for i, p in enumerate(prompts)]
    for request in requests:
        admit(pool, request)
    for i in free_order:
        pool.free(requests[i])


def cached_prompts(pool: BlockPool, prompts: list[list[int]]) -> list[bool]:
    return [num_hit_blocks(pool, p + [0]) == 1 for p in prompts]


def test_freed_cached_blocks_are_evicted_least_recently_freed_first():
    pool = BlockPool(num_blocks=4, block_size=2)
    prompts = [[1, 2], [3, 4], [5, 6]]
    fill_and_free_one_block_each(pool, prompts, free_order=[1, 0, 2])
    assert cached_prompts(pool, prompts) == [True, True, True]

    expected_after_each_allocation = [
        [True, True, True],  # the never-used (uncached) block goes first
        [True, False, True],  # then the least recently freed: [3,4]
        [False, False, True],
        [False, False, False],
    ]
    for i, expected in enumerate(expected_after_each_allocation):
        assert pool.allocate(make_request(f"x{i}", [0, 0]), 2)
        assert cached_prompts(pool, prompts) == expected
    assert_pool_consistent(pool)


def test_reusing_a_cached_block_makes_it_most_recently_freed():
    pool = BlockPool(num_blocks=4, block_size=2)
    prompts = [[1, 2], [3, 4], [5, 6]]
    fill_and_free_one_block_each(pool, prompts, free_order=[0, 1, 2])
    d = make_request("d", [1, 2, 7])  # hits [1,2], takes the unused block for its partial tail
    assert len(admit(pool, d)) == 1
    pool.free(d)

    for i in range(3):
        assert pool.allocate(make_request(f"x{i}", [0, 0]), 2)
    assert cached_prompts(pool, prompts) == [True, False, False]


def test_uncached_free_blocks_are_reused_before_cached_ones():
    pool = BlockPool(num_blocks=2, block_size=2)
    a = make_request("a", [1, 2])
    admit(pool, a)  # block 0, cached
    u = make_request("u", [3, 4])
    assert pool.allocate(u, 2)  # block 1, never computed
    pool.free(a)
    pool.free(u)  # freed last, yet reused first: it holds nothing worth keeping

    assert pool.allocate(make_request("x", [0, 0]), 2)
    assert pool.block_table("x") == [1]
    assert num_hit_blocks(pool, [1, 2, 0]) == 1


def test_a_freed_sequence_loses_its_tail_blocks_before_its_prefix():
    pool = BlockPool(num_blocks=4, block_size=2)
    a = make_request("a", [1, 2, 3, 4, 5, 6, 7])
    admit(pool, a)  # 3 full cached blocks and a partial one
    pool.free(a)
    hits_after = []
    for i in range(4):
        assert pool.allocate(make_request(f"x{i}", [0, 0]), 2)
        hits_after.append(num_hit_blocks(pool, [1, 2, 3, 4, 5, 6, 0]))
    assert hits_after == [3, 2, 1, 0]


@st.composite
def pool_ops(draw):
    """A pool and a sequence of ('admit', prompt) / ('free', index among live requests) steps, with
    prompts drawn from few shared stems so that prefixes are often shared."""
    block_size = draw(st.sampled_from([1, 2, 4]))
    num_blocks = draw(st.integers(1, 12))
    stems = draw(st.lists(st.lists(st.integers(0, 2), min_size=12, max_size=12), min_size=1, max_size=3))
    ops = []
    for _ in range(draw(st.integers(1, 30))):
        if draw(st.booleans()):
            stem, num_shared = draw(st.sampled_from(stems)), draw(st.integers(0, 12))
            suffix = draw(st.lists(st.integers(0, 2), max_size=12 - num_shared))
            ops.append(("admit", (stem[:num_shared] + suffix) or [0]))
        else:
            ops.append(("free", draw(st.integers(0, 100))))
    return BlockPool(num_blocks, block_size), ops


@settings(max_examples=150, deadline=None, derandomize=True)
@given(pool_ops())
def test_any_admit_and_free_sequence_keeps_counts_and_ends_all_free(case):
    pool, ops = case
    live = []
    for n, (op, arg) in enumerate(ops):
        if op == "admit":
            request = make_request(f"r{n}", arg)
            free_before = pool.num_free_blocks
            cached = pool.find_cached_prefix(request)
            if pool.allocate(request, request.num_tokens, cached):
                compute(pool, request)
                live.append(request)
            else:
                assert pool.num_free_blocks == free_before
                assert pool.block_table(request.request_id) == []
        elif live:
            pool.free(live.pop(arg % len(live)))
        assert_pool_consistent(pool)
    for request in live:
        pool.free(request)
    assert_all_free(pool)


def test_events_tell_a_follower_exactly_what_the_cache_holds():
    pool = BlockPool(num_blocks=4, block_size=2)
    before = make_request("before", [1, 2, 3, 4, 5])
    admit(pool, before)
    pool.record_events(True)  # a follower joins: the cache so far, each block after its parent, then events
    contents = pool.cached_contents()
    assert [(e[0], e[3]) for e in contents] == [("stored", (1, 2)), ("stored", (3, 4))]
    assert contents[1][2] == contents[0][1] and contents[0][2] is None
    pool.free(before)

    mirror = {h: tokens for _, h, _, tokens in contents}

    def follow() -> None:
        for event in pool.take_events():
            if event[0] == "stored":
                mirror[event[1]] = event[3]
            elif event[0] == "removed":
                del mirror[event[1]]
            else:
                mirror.clear()
        assert mirror == {h: b.token_ids for h, b in pool.cached_blocks.items()}

    for i, prompt in enumerate([[6, 7, 8, 9], [1, 2, 3, 4, 10], [11, 12, 13, 14, 15, 16, 17]]):
        request = make_request(f"r{i}", prompt)
        admit(pool, request)  # the last one evicts cached blocks to fit
        follow()
        pool.free(request)
    assert pool.reset_prefix_cache() > 0
    follow()
    assert mirror == {} and pool.take_events() == []
    pool.record_events(False)
    admit(pool, make_request("unfollowed", [1, 2, 3]))
    assert pool.events is None and pool.take_events() == []
