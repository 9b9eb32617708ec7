"""The encoder's byte-bounded LRU: eviction order, the byte bound, pinned entries, hit and miss counts."""

from __future__ import annotations

import pytest

from ditserve.services.encoder.embedding_cache import ByteLRU


def test_least_recently_used_goes_first_once_bytes_run_out() -> None:
    cache: ByteLRU[str] = ByteLRU(10)
    assert cache.put("a", "A", 4) and cache.put("b", "B", 4)
    assert cache.get("a") == "A"  # now b is the least recently used
    assert cache.put("c", "C", 4)
    assert "b" not in cache and cache.get("a") == "A" and cache.get("c") == "C"
    assert cache.get("b") is None
    assert (cache.stats.hits, cache.stats.misses, cache.stats.evictions) == (3, 1, 1)
    assert (cache.stats.entries, cache.stats.bytes) == (2, 8)


def test_a_value_larger_than_the_cache_is_not_stored_and_evicts_nothing() -> None:
    cache: ByteLRU[str] = ByteLRU(10)
    cache.put("a", "A", 6)
    assert not cache.put("big", "X", 11)
    assert "a" in cache and cache.stats.bytes == 6


def test_replacing_a_key_counts_its_bytes_once() -> None:
    cache: ByteLRU[str] = ByteLRU(10)
    cache.put("a", "A", 6)
    cache.put("a", "A2", 7)
    assert cache.get("a") == "A2" and cache.stats.bytes == 7 and len(cache) == 1


def test_pinned_entries_stay_while_others_are_evicted() -> None:
    cache: ByteLRU[str] = ByteLRU(10)
    cache.put("", "empty", 4, pinned=True)
    for key in "abcd":
        cache.put(key, key.upper(), 3)
    assert cache.get("") == "empty" and "d" in cache and cache.stats.bytes <= 10
    assert not cache.put("huge", "H", 7)  # cannot fit beside the pinned 4 bytes


def test_a_zero_capacity_cache_stores_nothing() -> None:
    cache: ByteLRU[str] = ByteLRU(0)
    assert not cache.put("a", "A", 1) and cache.get("a") is None
    with pytest.raises(ValueError):
        ByteLRU(-1)
