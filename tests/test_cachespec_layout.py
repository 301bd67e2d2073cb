"""Per-layer cache specs: the layout they make and the hybrid KV cache manager serving it
(windowed groups freeing old blocks, prefix hits across groups, recurrent-state slots)."""

from __future__ import annotations

import pytest

from tessellm.config import EngineArgs
from tessellm.engine.cache_layout import (
    KVGroup,
    build_layout,
    check_layout_support,
    make_kv_cache_manager,
    pages_needed,
    window_blocks,
)
from tessellm.engine.hybrid_kv_cache_manager import HybridKVCacheManager
from tessellm.engine.kv_cache_manager import KVCacheManager
from tessellm.errors import ConfigError
from tessellm.interfaces.cache_spec import (
    FullAttentionSpec,
    RecurrentStateSpec,
    SlidingWindowSpec,
    config_cache_specs,
)
from tessellm.interfaces.request import Request
from tessellm.sampling_params import SamplingParams

FULL, W8 = FullAttentionSpec(), SlidingWindowSpec(8)
STATE = RecurrentStateSpec(((4, 3), (2, 4, 8)))


def gemma3_270m_specs() -> list:
    # 18 layers, every sixth global: 15 windowed (512) and 3 full.
    return [FULL if i % 6 == 5 else SlidingWindowSpec(512) for i in range(18)]


def test_gemma3_shape_makes_one_full_and_five_windowed_groups():
    layout = build_layout(gemma3_270m_specs())
    assert layout.group_size == 3
    assert layout.groups[0] == KVGroup((5, 11, 17), None)
    assert [g.window for g in layout.groups[1:]] == [512] * 5
    assert sorted(i for g in layout.groups for i in g.layers) == list(range(18))
    # 32k tokens in blocks of 16: the full group holds 2048 pages, each windowed one 33.
    assert layout.pages_per_request(32768, 16) == 2048 + 5 * 33
    flat = build_layout(gemma3_270m_specs(), hybrid=False)
    assert len(flat.groups) == 1 and flat.group_size == 18 and not flat.frees_blocks
    assert flat.pages_per_request(32768, 16) == 2048


def test_uniform_windows_free_on_the_one_table_and_plain_layouts_stay_plain():
    assert build_layout([W8] * 4).groups == (KVGroup((0, 1, 2, 3), 8),)
    assert build_layout([W8] * 4).frees_blocks
    assert build_layout([FULL] * 4).plain
    uneven = build_layout([FULL, W8, W8, W8, FULL, W8, W8])
    assert [len(g.layers) for g in uneven.groups] == [2, 2, 2, 1]
    mamba = build_layout([STATE] * 3, num_state_slots=5)
    assert mamba.has_state and mamba.num_state_slots == 5 and mamba.group_size == 0
    assert STATE.bytes_per_slot(__import__("torch").float32) == (12 + 64) * 4


def test_config_specs_follow_layer_types():
    from transformers import Gemma3TextConfig

    config = Gemma3TextConfig(
        num_hidden_layers=4,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"] * 2,
    )
    assert config_cache_specs(config) == [W8, FULL, W8, FULL]


def _request(rid: str, num_tokens: int, offset: int = 0) -> Request:
    prompt = [(offset + i) % 50 + 3 for i in range(num_tokens)]
    return Request(rid, prompt, SamplingParams(max_tokens=64))


def _advance(kv: HybridKVCacheManager, req: Request, n: int) -> None:
    assert kv.can_allocate(req, n)
    kv.allocate(req, n)
    req.num_computed_tokens += n


def test_windowed_group_keeps_only_the_window_and_reuses_freed_pages():
    layout = build_layout([FULL, W8])
    kv = HybridKVCacheManager(40, 4, True, layout=layout)
    req = _request("a", 6)
    _advance(kv, req, 6)
    free_after_prompt = kv.num_free_blocks
    for _ in range(30):  # decode one token at a time
        req.output_token_ids.append(7)
        _advance(kv, req, 1)
        held = [b for b in req.group_block_ids[0] if b != kv.null_block]
        assert len(held) <= window_blocks(8, 4)
    # The full table covers every position; the windowed one frees as it goes.
    assert len(req.block_ids) == -(-36 // 4)
    assert len(req.group_block_ids[0]) == len(req.block_ids)
    held = [b for b in req.group_block_ids[0] if b != kv.null_block]
    assert len(held) == 2 and free_after_prompt - kv.num_free_blocks == 9 + 2 - 4
    kv.free(req)
    assert kv.num_free_blocks == 39 and req.block_ids == [] and req.group_block_ids == []


def test_prefix_hit_needs_the_window_of_every_windowed_group():
    kv = HybridKVCacheManager(64, 4, True, layout=build_layout([FULL, W8]))
    first = _request("a", 40)
    _advance(kv, first, 40)
    kv.free(first)  # every block published and then free: all are hits
    again = _request("b", 40)
    assert kv.get_computed_blocks(again) == 36
    assert again.group_block_ids[0][:7] == [kv.null_block] * 7  # outside the window
    _advance_from = again.num_computed_tokens = 36
    assert _advance_from == 36 and kv.can_allocate(again, 4)
    kv.free(again)
    # Evict the windowed pages of the last blocks: the hit shrinks to where a window's
    # pages are all still cached (none here: they were freed last, evicted first).
    hog = _request("c", 4 * 40, offset=7)
    kv.allocate(hog, 4 * 31)  # 62 of the 63 pages
    third = _request("d", 40)
    hit = kv.get_computed_blocks(third)
    assert hit < 36
    kv.free(third)
    kv.free(hog)


def test_state_slots_are_held_while_running_and_limit_admission():
    layout = build_layout([STATE, STATE], num_state_slots=2)
    kv = HybridKVCacheManager(100, 4, True, layout=layout)
    assert not kv.enable_prefix_caching  # no prefix cache with recurrent layers
    a, b, c = _request("a", 5), _request("b", 5), _request("c", 5)
    _advance(kv, a, 5)
    _advance(kv, b, 5)
    assert {a.state_slot, b.state_slot} == {0, 1}
    assert kv.get_computed_blocks(c) == 0
    assert not kv.can_allocate(c, 5)
    kv.free(a)  # finished or preempted: its slot goes back
    assert a.state_slot == -1
    _advance(kv, c, 5)
    assert c.state_slot in (0, 1) and c.state_slot != b.state_slot


def test_capacity_leaves_room_for_the_windowed_groups():
    # 49 pages after the null page; the windowed group may need 3 of them.
    assert HybridKVCacheManager(50, 4, True, layout=build_layout([FULL, W8])).num_blocks == 46
    # One windowed table: a lone request's table frees as it grows.
    assert HybridKVCacheManager(50, 4, True, layout=build_layout([W8, W8])).num_blocks == 49


class NoLayoutsManager(KVCacheManager):
    """A third-party manager that says nothing about cache layouts."""


def test_the_engine_picks_or_refuses_a_manager_for_the_layout():
    args = EngineArgs(model="x", block_size=4, max_num_seqs=2)
    windowed, mamba = build_layout([FULL, W8]), build_layout([STATE], num_state_slots=2)
    plain = build_layout([FULL, FULL])
    assert type(make_kv_cache_manager(KVCacheManager, 20, args, plain)) is KVCacheManager
    assert isinstance(
        make_kv_cache_manager(KVCacheManager, 20, args, windowed), HybridKVCacheManager
    )
    check_layout_support(NoLayoutsManager, plain, args)
    with pytest.raises(ConfigError, match="disable_hybrid_kv_cache_manager"):
        check_layout_support(NoLayoutsManager, windowed, args)
    with pytest.raises(ConfigError, match="supports_cache_layouts"):
        check_layout_support(NoLayoutsManager, mamba, args)
    speculating = EngineArgs(
        model="x", speculative_config={"method": "ngram", "num_speculative_tokens": 2}
    )
    with pytest.raises(ConfigError, match="speculative"):
        check_layout_support(KVCacheManager, mamba, speculating)
    # Pages worth keeping: max_num_seqs full-length requests (and the null page).
    assert pages_needed(windowed, args, 64) == 2 * (16 + 3) + 1 + 1
    assert pages_needed(plain, args, 64) == 2 * 16 + 1
