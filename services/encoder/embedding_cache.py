"""The encoder's embedding cache: a least-recently-used map bounded by bytes, with hit and miss counts.

A shared service sees the same prompts again (retries, variations over seeds, the empty negative prompt of
every CFG request), and a prompt's embedding depends only on the prompt, the sequence length and the
encoder (prompts are encoded one at a time), so a hit returns exactly what encoding would. Bounded by the
bytes of what it holds, not by entries: a 512-token T5 embedding is 4 MB, a 16-token one a few kB. Pinned
entries (the empty prompt) are never evicted. Pure Python, thread-safe; no torch, no gRPC.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

V = TypeVar("V")


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    entries: int = 0
    bytes: int = 0


class ByteLRU(Generic[V]):
    """Values by key, least recently used evicted first once their sizes sum past `capacity_bytes`."""

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[Hashable, tuple[V, int, bool]] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = CacheStats()

    def get(self, key: Hashable) -> V | None:
        """The value, now the most recently used; None (a miss) when absent."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.stats.misses += 1
                return None
            self._entries.move_to_end(key)
            self.stats.hits += 1
            return entry[0]

    def put(self, key: Hashable, value: V, nbytes: int, pinned: bool = False) -> bool:
        """Stores the value, evicting unpinned least recently used entries to make room; False (nothing
        stored) when it cannot fit beside the pinned entries."""
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.stats.bytes -= old[1]
            pinned_bytes = sum(size for _, size, kept in self._entries.values() if kept)
            if nbytes + pinned_bytes > self.capacity_bytes:
                self._update_counts()
                return False
            while self.stats.bytes + nbytes > self.capacity_bytes:
                victim = next(k for k, (_, _, kept) in self._entries.items() if not kept)
                self.stats.bytes -= self._entries.pop(victim)[1]
                self.stats.evictions += 1
            self._entries[key] = (value, nbytes, pinned)
            self.stats.bytes += nbytes
            self._update_counts()
            return True

    def _update_counts(self) -> None:
        self.stats.entries = len(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries
