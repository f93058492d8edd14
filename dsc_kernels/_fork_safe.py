"""A lock a forked child gets fresh. A child forked (DataLoader workers, multiprocessing's fork) while another thread
of the parent held a plain lock inherits it held by a thread that does not exist there, and waits on it forever."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable


class ForkSafeLock:
    """``with lock:`` as with ``factory()`` (threading.Lock or RLock), replaced by a new one in a forked child."""

    def __init__(self, factory: Callable[[], object] = threading.Lock):
        self._factory = factory
        self._lock = factory()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._renew)

    def _renew(self) -> None:
        self._lock = self._factory()

    def __enter__(self):
        return self._lock.__enter__()

    def __exit__(self, *exc) -> None:
        self._lock.__exit__(*exc)
