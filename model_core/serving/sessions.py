"""What an interactive session holds, what it costs in memory, and the cap on volumes preprocessed at once.

A :class:`Session` is one client's view of one image (the preprocessed volume, its slice
features, and per structure a :class:`Track` of prompts and results); :func:`held_bytes` counts
every tensor it keeps, so the session cache's MiB cap bounds what the process really holds.
:class:`VolumeSlots` caps how many whole volumes are read and preprocessed at once (a queue
with a bounded wait, then :class:`~model_core.io.validation.ServiceBusy`).
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from typing import Any, Callable

import numpy as np
import torch
from monai.data import MetaTensor

from model_core.io.validation import ServiceBusy
from model_core.modeling.memory import SupportMemory
from model_core.volume_state import VolumeState

__all__ = ["AnswerReaders", "Session", "Track", "VolumeSlots", "held_bytes"]


def held_bytes(*roots: Any, skip: tuple[type, ...] = ()) -> int:
    """Bytes of every tensor and array reachable from ``roots``, each storage counted once.

    Follows containers (dict, list, tuple, set), a ``MetaTensor``'s meta and applied
    operations, and the attributes of this project's own objects (``model_core.*``);
    views and expanded tensors count their whole storage (what stays allocated),
    shared storages once. Objects of ``skip`` types (the network, a shared support
    memory) and modules are not entered. Python objects' own overhead is not counted.

    Why here: ``torch`` and ``sys.getsizeof`` size one tensor or object, not what a
    structure of them keeps alive.
    """
    storages: set[tuple[str, int]] = set()
    visited: set[int] = set()
    total = 0
    stack = list(roots)
    while stack:
        obj = stack.pop()
        if obj is None or isinstance(obj, (str, bytes, int, float, bool)) or id(obj) in visited:
            continue
        visited.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            key = (str(obj.device), storage.data_ptr())
            if key not in storages:
                storages.add(key)
                total += storage.nbytes()
            if isinstance(obj, MetaTensor):
                stack += [obj.meta, obj.applied_operations]
        elif isinstance(obj, np.ndarray):
            base = obj
            while isinstance(base.base, np.ndarray):
                base = base.base
            # ctypes.data, not __array_interface__: that builds the dtype's description, 34 us for a NIfTI header's
            # structured array against 1.4 us (a session's walk met 36 of them in its MetaTensors' meta)
            key = ("numpy", base.ctypes.data)
            if key not in storages:
                storages.add(key)
                total += base.nbytes
        elif isinstance(obj, torch.nn.Module) or (skip and isinstance(obj, skip)):
            continue
        elif isinstance(obj, dict):
            stack += list(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack += list(obj)
        elif type(obj).__module__.startswith("model_core") and hasattr(obj, "__dict__"):
            stack += list(vars(obj).values())
    return total


class VolumeSlots:
    """At most ``slots`` requests hold a volume being read, preprocessed and worked on at once.

    A waiting request gets a slot in arrival order within ``wait_s`` seconds, or
    :class:`ServiceBusy` with a ``Retry-After`` estimated from how long recent slots were held.
    ``threading.Semaphore`` bounds the count but neither keeps arrival order nor knows
    how long to tell a client to wait.

    Args:
        slots: requests served at once (at least 1).
        wait_s: longest wait for a slot (0: answer busy at once).
        what: what a slot is for, in the busy message.
    """

    def __init__(self, slots: int, wait_s: float, what: str = "volumes being preprocessed"):
        if int(slots) < 1:
            raise ValueError(f"slots must be at least 1, got {slots!r}.")
        if not float(wait_s) >= 0:
            raise ValueError(f"wait_s must be a number of seconds >= 0, got {wait_s!r}.")
        self.slots, self.wait_s, self.what = int(slots), float(wait_s), what
        self._condition = threading.Condition()
        self._busy = 0
        self._queue: list[object] = []  # waiting tickets, oldest first
        self._mean_hold: float | None = None  # seconds a slot is held, exponentially averaged

    @property
    def in_use(self) -> int:
        return self._busy

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def retry_after(self) -> float:
        """Seconds after which a new request probably gets a slot: the queue ahead times the mean hold."""
        hold = self._mean_hold if self._mean_hold is not None else max(self.wait_s, 1.0)
        rounds = math.ceil((len(self._queue) + 1) / self.slots)
        return min(max(hold * rounds, 1.0), 3600.0)

    @contextlib.contextmanager
    def hold(self, wait_s: float | None = None):
        """A slot for the ``with`` block, waiting at most ``wait_s`` seconds (default: the configured wait).

        Raises:
            ServiceBusy: no slot came free in time.
        """
        ticket = object()
        wait_s = self.wait_s if wait_s is None else float(wait_s)
        deadline = time.monotonic() + wait_s
        with self._condition:
            self._queue.append(ticket)
            try:
                while self._busy >= self.slots or self._queue[0] is not ticket:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise ServiceBusy(
                            f"The server is busy: {self._busy} {self.what} already (at most {self.slots}) and "
                            f"{len(self._queue) - 1} more waiting; waited {wait_s:g} s. Retry after the "
                            "Retry-After seconds.",
                            self.retry_after(),
                        )
                    self._condition.wait(min(left, 3600.0))
            finally:
                self._queue.remove(ticket)
                self._condition.notify_all()  # the next in line may go (or time out) now
            self._busy += 1
        start = time.monotonic()
        try:
            yield
        finally:
            held = time.monotonic() - start
            with self._condition:
                self._busy -= 1
                self._mean_hold = held if self._mean_hold is None else 0.7 * self._mean_hold + 0.3 * held
                self._condition.notify_all()


class AnswerReaders:
    """How many callers an interactive answer was handed to and have not yet said they are done reading it.

    Why: a follow-up click's answer is the previous answer with the slices it changed mapped again. Copying the
    whole previous answer first took 18-23 ms of a follow-up on a 512 x 512 x 160 volume (2-core Intel Xeon);
    writing into it is safe once no caller reads it. The service counts a reader on the model thread as it hands
    an answer out (so none can appear while the next answer is made there), and a caller's
    :meth:`~model_core.serving.service.Segmentation.release` counts it off. A caller that never releases keeps
    its answer unchanged: the next follow-up copies it, as before.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._count = 0

    def add(self) -> Callable[[], None]:
        """One more reader; returns its release (which counts once, however often it is called)."""
        with self._lock:
            self._count += 1
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if not released:
                    released = True
                    self._count -= 1

        return release

    @property
    def idle(self) -> bool:
        """No caller reads the answer."""
        with self._lock:
            return self._count == 0


class Track:
    """One structure's interactive result in a session: the clicks it answers and the volume state.

    ``prompts`` is ``{slice: {"points": [[x, y], ...], "labels": [...], "box": [...] | None}}``
    on the model grid, as the last request sent them (the plugins send the whole list).
    ``answer`` is the label map last answered from ``state`` (in the image's space), which a
    follow-up click updates on the slices it changed (in place once ``answer_readers`` is idle);
    ``answered_logits`` the state's ``low_res_logits`` it was made from.
    """

    def __init__(self, state: VolumeState, prompts: dict[int, dict[str, Any]], support: SupportMemory | None):
        self.state, self.prompts, self.support = state, prompts, support
        self.answer: MetaTensor | None = None
        self.answered_logits: torch.Tensor | None = None
        self.answer_readers = AnswerReaders()

    def changed_slices(self, prompts: dict[int, dict[str, Any]]) -> list[int] | None:
        """Slices whose clicks grew since the last request; None when a click or box was removed
        or changed (then only a full pass gives the right answer)."""
        changed = []
        for z, old in self.prompts.items():
            new = prompts.get(z)
            n = len(old["points"])
            if (
                new is None
                or new["box"] != old["box"]
                or new["points"][:n] != old["points"]
                or new["labels"][:n] != old["labels"]
            ):
                return None
        for z, new in prompts.items():
            if z not in self.prompts or new != self.prompts[z]:
                changed.append(z)
        return sorted(changed)


class Session:
    """One client's interactive work on one image: the preprocessed volume, its feature cache
    and, per structure, the last result (:class:`Track`).

    ``held`` is what the session holds in bytes, measured by :meth:`measure` whenever it
    changes (by the thread that changed it, under the model lock), so the session table
    can be summed without walking sessions another request is changing.
    """

    def __init__(self, image: MetaTensor, slices: torch.Tensor):
        self.image, self.slices = image, slices
        self.anchor = None  # the VolumeState whose feature cache later states share
        self.tracks: dict[tuple[int, bool], Track] = {}
        self.used = time.monotonic()
        self.held = self.measure()

    def measure(self) -> int:
        """Every tensor the session keeps (volume, slices, features, results, prompts' memories), each
        storage once; not the network nor the shared support memory: what ``session_cache_mb`` caps."""
        self.held = held_bytes(self.image, self.slices, self.anchor, self.tracks, skip=(SupportMemory,))
        return self.held
