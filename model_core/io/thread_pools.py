"""A process-wide thread pool that is made on first use and made again in a forked child.

Why: ``ThreadPoolExecutor`` does not survive ``fork``. A child inherits the pool object but
none of its threads, and the pool, which counts its idle threads, hands new work to threads
that are not there: the child's first ``submit`` waits for ever. A DataLoader worker forked
after its parent read a volume, or a job forked after its parent wrote a label, did exactly
that (``tests/model_core/test_readers.py``, ``test_block_gzip.py``).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

__all__ = ["LazyThreadPool"]


class LazyThreadPool:
    """``submit`` to a ``ThreadPoolExecutor`` of ``workers`` threads, made on first use in each process.

    Args:
        workers: how many threads (read when the pool is made).
        name: the threads' name prefix.
    """

    def __init__(self, workers: Callable[[], int], name: str):
        self._workers, self._name = workers, name
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        os.register_at_fork(after_in_child=self._forget)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self._workers(), thread_name_prefix=self._name)
            return self._executor.submit(fn, *args)

    def _forget(self) -> None:
        """In a forked child: none of the parent's threads are here, so the next ``submit`` makes a pool."""
        self._executor, self._lock = None, threading.Lock()
