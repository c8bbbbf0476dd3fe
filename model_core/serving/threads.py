"""Which thread of a server runs torch: the model's work on one thread with every core, file work on one core.

Why a server needs this: PyTorch's CPU kernels run on OpenMP (libgomp here), which gives every
thread that starts a parallel op its own team of worker threads. A server answers requests on a
pool of threads (FastAPI's, up to 40), so each request thread that touched torch grew a team of
its own. Once libgomp manages more threads than the machine has CPUs it stops spin-waiting
between parallel regions, and from then on every op pays a sleep and a wake-up. Measured on a
2-core AMD EPYC, the same first click inside the service (30 slices of 96 px): 0.50-0.52 s with
every torch call on one thread; 0.86-1.26 s on that thread once one parallel op had run on
another (for the life of the process); 1.04-1.46 s inside the server.

- :func:`run_on_model_thread`: the model's work (weights, support memory, encoding, tracking,
  postprocessing to the image's space) on one thread for the whole process, with torch's
  thread count: the process's only OpenMP team. Model work was serialized by a lock already;
  now it is also always the same thread.
- :func:`one_core`: file work (reading and preprocessing a new volume) in the request's own
  thread, with OpenMP limited to that thread: it makes no team, and runs beside another
  request's model work as before (preprocessing a 256x256x64 volume took the same 0.15 s on
  one thread as on two).

On a GPU the model's kernels were queued under one lock before, and are now queued from one
thread (not measured).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable, TypeVar

import torch
from threadpoolctl import ThreadpoolController

__all__ = ["model_thread_ident", "one_core", "run_on_model_thread"]

T = TypeVar("T")


class _ModelThread:
    """One daemon worker thread, started on first use; calls from it run inline (model work may nest).

    A daemon, unlike ``ThreadPoolExecutor``'s workers, which the interpreter joins at exit: a
    command interrupted with Ctrl-C, or a server told to stop, then ends at once instead of
    after the volume under way.
    """

    def __init__(self):
        self._guard = threading.Lock()
        self._queue: queue.SimpleQueue | None = None
        self.ident: int | None = None

    def _serve(self, calls: queue.SimpleQueue) -> None:
        self.ident = threading.get_ident()
        torch.get_num_threads()  # torch sets this thread's OpenMP threads now, from torch.set_num_threads
        while True:
            future, fn, args, kwargs = calls.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as e:  # the caller raises it
                future.set_exception(e)
            del future, fn, args, kwargs  # hold no request's tensors while idle

    def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        if threading.get_ident() == self.ident:
            return fn(*args, **kwargs)
        with self._guard:
            if self._queue is None:
                self._queue = queue.SimpleQueue()
                threading.Thread(target=self._serve, args=(self._queue,), name="model", daemon=True).start()
            calls = self._queue
        future: Future = Future()
        calls.put((future, fn, args, kwargs))
        return future.result()

    def forget(self) -> None:
        """After a fork: the child has no worker thread; the next call starts one."""
        self._guard = threading.Lock()
        self._queue, self.ident = None, None


_MODEL_THREAD = _ModelThread()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_MODEL_THREAD.forget)


def run_on_model_thread(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` on the process's model thread, waiting for it; its exception is raised here.

    Calls from the model thread itself run at once. Per-thread torch state (``inference_mode``,
    ``no_grad``) does not travel with the call: ``fn`` sets its own.
    """
    return _MODEL_THREAD.run(fn, *args, **kwargs)


def model_thread_ident() -> int | None:
    """The model thread's ``threading.get_ident()`` (None before its first use)."""
    return _MODEL_THREAD.ident


_CONTROLLER: ThreadpoolController | None = None


@contextlib.contextmanager
def one_core():
    """Torch's CPU ops in this block run on the calling thread alone (no OpenMP team); restored after.

    The limit is OpenMP's own per-thread setting (threadpoolctl), so the model thread keeps its
    cores. Torch sets a thread's OpenMP threads on its first parallel op, which would undo the
    limit, so that happens first.
    """
    global _CONTROLLER
    if _CONTROLLER is None:
        _CONTROLLER = ThreadpoolController()
    torch.get_num_threads()
    with _CONTROLLER.limit(limits=1, user_api="openmp"):
        yield
