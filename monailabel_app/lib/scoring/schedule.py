"""When automatic scoring runs, so that it never delays an interactive request.

MONAI Label starts a scoring run (a subprocess that builds the app, loads the model and
segments every unlabelled image) at start-up, after every Next Sample and after every
training, at the server's own CPU priority: on a 2-core machine the start-up run competed
with the first Auto-Segmentation for minutes, and every Next Sample queued another full run.
MONAI Label has no setting between "always" and "never" (``MONAI_LABEL_AUTO_UPDATE_SCORING``).

``--conf scoring idle`` (the default):

- start-up starts no run (scores stored by an earlier run are still used; the ``confidence``
  strategy proposes images without a score first);
- Next Sample, a saved label and newly published weights ask for a run; it starts once no
  inference request has run for ``--conf scoring_idle_s`` seconds, one run at a time, and only
  when the weights or the labelled images changed since the last run this server started (so
  Next Sample after Next Sample starts nothing new);
- every scoring subprocess, also one asked for by ``POST /scoring/<method>`` or by a training
  run, gets idle CPU priority (:func:`lower_priority`: ``SCHED_IDLE``, else nice 19): it runs on
  what requests leave.

``immediate`` is MONAI Label's own behaviour (kept to measure against), ``off`` runs scoring
only when asked (``POST /scoring/<method>``, still at idle priority).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from monailabel.utils.async_tasks.utils import processes

logger = logging.getLogger(__name__)

__all__ = ["MODES", "ScoringSchedule", "lower_priority", "scoring_pids"]

MODES = ("idle", "immediate", "off")
_NEVER = object()


def scoring_pids() -> list[int]:
    """Process ids of the scoring subprocesses MONAI Label is running (``AsyncTask``'s)."""
    return [int(p.pid) for p in list(processes("scoring").values()) if p.poll() is None]


def lower_priority(pid: int) -> int:
    """Put every thread of process ``pid`` at idle CPU priority; returns how many threads were changed.

    Linux schedules threads, not processes, and a thread inherits its creator's policy: the
    threads that exist now (the interpreter, torch's worker pool) are changed one by one, and
    later ones follow. ``SCHED_IDLE`` runs a thread only on CPU time nothing else wants; where
    it is refused, nice 19. A process that ended meanwhile changes nothing.
    """
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{int(pid)}/task")]
    except OSError:
        return 0
    changed = 0
    for tid in tids:
        try:
            if os.sched_getscheduler(tid) == os.SCHED_IDLE:
                continue
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            changed += 1
        except PermissionError:
            try:
                if os.getpriority(os.PRIO_PROCESS, tid) < 19:
                    os.setpriority(os.PRIO_PROCESS, tid, 19)
                    changed += 1
            except OSError:
                pass
        except (OSError, AttributeError):  # the thread ended, or no sched_* on this system
            continue
    return changed


class ScoringSchedule:
    """Start automatic scoring runs when the server is idle and the scores are stale (see the module docstring).

    Args:
        mode: ``idle``, ``immediate`` or ``off``.
        idle_s: seconds without an inference request before a run may start (``idle`` mode).
        start_run: starts one scoring run (MONAI Label's ``async_scoring`` of every method).
        scores_key: what the scores depend on (the weights and the labelled images); a run starts
            only when it differs from the key of the last run started.
        weights_stamp: changes when new weights are published (a training run ended): asks for a run.
        clock: seconds, monotonic.
    """

    def __init__(
        self,
        mode: str,
        idle_s: float,
        start_run: Callable[[], Any],
        scores_key: Callable[[], Any],
        weights_stamp: Callable[[], Any] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if mode not in MODES:
            raise ValueError(f"--conf scoring must be one of {', '.join(MODES)}, got {mode!r}.")
        self.mode, self.idle_s = mode, float(idle_s)
        self._start_run, self._scores_key, self._weights_stamp, self._clock = (
            start_run,
            scores_key,
            weights_stamp,
            clock,
        )
        self._lock = threading.Lock()
        self._in_flight = 0
        self._last_activity = clock()
        self._wanted: str | None = None
        self._last_key: Any = _NEVER
        self._last_stamp = weights_stamp()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: ``[(clock, reason)]`` of the runs this schedule started
        self.runs: list[tuple[float, str]] = []

    @contextmanager
    def request(self) -> Iterator[None]:
        """Around an inference request: no run starts while one is in flight, nor ``idle_s`` after it."""
        with self._lock:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1
                self._last_activity = self._clock()

    def ask(self, reason: str) -> None:
        """Something that may change the scores happened (Next Sample, a saved label): score when idle."""
        with self._lock:
            self._wanted = self._wanted or reason

    def tick(self, running: list[int] | None = None) -> str | None:
        """One step: lower the priority of running scoring processes and maybe start a run.

        Args:
            running: pids of the scoring subprocesses (default: :func:`scoring_pids`).

        Returns:
            Why a run was started, or None.
        """
        running = scoring_pids() if running is None else running
        if self.mode != "immediate":
            for pid in running:
                if lower_priority(pid):
                    logger.info(f"Scoring process {pid} runs at idle CPU priority.")
        if self.mode != "idle":
            return None
        stamp = self._weights_stamp()
        if stamp != self._last_stamp:
            self._last_stamp = stamp
            self.ask("new weights")
        with self._lock:
            idle = not self._in_flight and self._clock() - self._last_activity >= self.idle_s
            if self._wanted is None or not idle or running:
                return None
            reason = self._wanted
        key = self._scores_key()  # may raise (a PACS that does not answer): the request stays
        with self._lock:
            self._wanted = None
        if key == self._last_key:
            logger.info(f"Scoring not started ({reason}): the weights and labelled images are those of the last run.")
            return None
        self._last_key = key
        self.runs.append((self._clock(), reason))
        logger.info(f"Scoring started ({reason}) after {self.idle_s:g} s without inference requests.")
        self._start_run()
        return reason

    # ------------------------------------------------------------------ the thread
    def start(self, poll_s: float = 1.0) -> None:
        """Call :meth:`tick` every ``poll_s`` seconds in a daemon thread (the server's)."""
        if self._thread is not None:
            return

        def loop():
            while not self._stop.wait(poll_s):
                try:
                    self.tick()
                except Exception:  # the schedule must outlive a PACS that does not answer for a while
                    logger.exception("Scoring schedule: a step failed; trying again")

        self._thread = threading.Thread(target=loop, name="scoring-schedule", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
