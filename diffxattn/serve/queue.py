"""One worker thread runs one run at a time, and the newest request wins.

A new request replaces the one waiting (if any: it never starts) and asks the running one to stop; a run
stops at its next denoising step (`Run.step`, called from the pipeline's step callback, raises `Cancelled`).
So a slider dragged across 20 values starts at most two runs, and the image shown is the last value's.
Finished runs are kept for their downloads, the newest `keep` of them only: memory stays flat.

    queue = RunQueue(execute)          # execute(run) -> result dict, calling run.step(i, n) every step
    run = queue.submit(request)
    for event in run.events_after(0): ...
"""

from __future__ import annotations

import itertools
import threading
import traceback
from collections import OrderedDict
from typing import Callable

from ..errors import USER_ERRORS, message

FINAL = ("done", "failed", "cancelled")


class Cancelled(Exception):
    """Raised inside a run at its next step once it was cancelled or superseded."""


class Run:
    """One request's life: queued -> running -> done | failed | cancelled, told as a list of events."""

    def __init__(self, run_id: int, request):
        self.id, self.request = run_id, request
        self.state = "queued"
        self.result: dict | None = None
        self.events: list[dict] = [{"type": "queued", "run": run_id}]
        self._cancel_reason: str | None = None
        self._cond = threading.Condition()

    def emit(self, kind: str, **data) -> None:
        with self._cond:
            self.events.append({"type": kind, "run": self.id, **data})
            if kind in FINAL or kind == "running":
                self.state = "running" if kind == "running" else kind
            self._cond.notify_all()

    def cancel(self, reason: str = "cancelled") -> None:
        """Ask the run to stop at its next step (a queued run is dropped by the queue)."""
        self._cancel_reason = self._cancel_reason or reason

    @property
    def cancelled(self) -> bool:
        return self._cancel_reason is not None

    def step(self, done: int, total: int) -> None:
        """Called once per denoising step: report progress, or stop here if cancelled."""
        if self._cancel_reason is not None:
            raise Cancelled(self._cancel_reason)
        self.emit("progress", step=done, total=total)

    @property
    def finished(self) -> bool:
        return self.state in FINAL

    def events_after(self, seen: int, timeout: float | None = None) -> list[dict]:
        """The events after the first `seen`, waiting up to `timeout` seconds for one if there are none yet."""
        with self._cond:
            self._cond.wait_for(lambda: len(self.events) > seen, timeout)
            return self.events[seen:]


class RunQueue:
    """Newest-wins queue in front of one worker thread (torch gets the cores; two runs would only share them)."""

    def __init__(self, execute: Callable[[Run], dict], keep: int = 8):
        self._execute, self._keep = execute, keep
        self._ids = itertools.count(1)
        self._runs: OrderedDict[int, Run] = OrderedDict()
        self._waiting: Run | None = None
        self._current: Run | None = None
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._work, name="diffxattn-runs", daemon=True)
        self._thread.start()

    def submit(self, request) -> Run:
        with self._cond:
            if self._closed:
                raise RuntimeError("the run queue is closed")
            run = Run(next(self._ids), request)
            if self._waiting is not None:  # never started: dropped at once
                self._waiting.cancel(f"superseded by run {run.id}")
                self._waiting.emit("cancelled", reason=f"superseded by run {run.id}")
            if self._current is not None:
                self._current.cancel(f"superseded by run {run.id}")
            self._waiting = run
            self._runs[run.id] = run
            self._prune()
            self._cond.notify_all()
            return run

    def cancel(self, run_id: int) -> bool:
        """Cancel a queued or running run; False if there is no such run or it already finished."""
        with self._cond:
            run = self._runs.get(run_id)
            if run is None or run.finished:
                return False
            run.cancel()
            if run is self._waiting:
                self._waiting = None
                run.emit("cancelled", reason="cancelled")
            return True

    def get(self, run_id: int) -> Run | None:
        with self._cond:
            return self._runs.get(run_id)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker: the running run is cancelled at its next step, a waiting one dropped."""
        with self._cond:
            self._closed = True
            for run in (self._waiting, self._current):
                if run is not None:
                    run.cancel("the server is stopping")
            if self._waiting is not None:
                self._waiting.emit("cancelled", reason="the server is stopping")
                self._waiting = None
            self._cond.notify_all()
        self._thread.join(timeout)

    def _prune(self) -> None:
        """Forget the oldest finished runs beyond `keep` (their results, images and maps)."""
        finished = [i for i, r in self._runs.items() if r.finished]
        for run_id in finished[:max(0, len(finished) - self._keep)]:
            del self._runs[run_id]

    def _work(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._waiting is not None or self._closed)
                if self._closed:
                    return
                run, self._waiting = self._waiting, None
                self._current = run
            run.emit("running")
            try:
                run.result = self._execute(run)
                run.emit("done")
            except Cancelled as e:
                run.emit("cancelled", reason=str(e))
            except Exception as e:  # a failed run is told on the page; the server keeps serving
                if not isinstance(e, USER_ERRORS):
                    traceback.print_exc()  # a bug: its traceback goes to the server's terminal
                run.emit("failed", message=message(e))
            finally:
                with self._cond:
                    self._current = None
                    self._prune()
