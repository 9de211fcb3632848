"""A bounded, expiring map from /embed ids to embeddings (LRU eviction + TTL)."""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable

import numpy as np


class EmbeddingCache:
    def __init__(self, max_size: int, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        self.max_size, self.ttl_s, self._clock = max_size, ttl_s, clock
        self._items: OrderedDict[str, tuple[float, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, vector: np.ndarray) -> str:
        key = uuid.uuid4().hex
        # A copy: the vector is a row of its forward pass's output, which a view would keep alive
        # (up to a whole batch per cached id: hundreds of MB for a full cache).
        vector = np.array(vector, dtype=np.float32)
        with self._lock:
            self._items[key] = (self._clock() + self.ttl_s, vector)
            while len(self._items) > self.max_size:
                self._items.popitem(last=False)  # least recently used
        return key

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            expires, vector = item
            if self._clock() >= expires:
                del self._items[key]
                return None
            self._items.move_to_end(key)
            return vector
