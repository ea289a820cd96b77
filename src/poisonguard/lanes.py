"""Detector lanes (and other independent work) in forked processes.

:func:`poisonguard.sanitize.run_detectors` splits the detectors into lanes (one per core). Lanes
that are threads of one process share its interpreter lock, and the detectors' Python-level work
(candidate loops, per-row strings) does not overlap: on the 120,819 rows of a nightly delta the two
lanes as threads took 24-26 s (eleventh session), as two processes 18-21 s (one lane: 28-33 s). A
:class:`ForkedLane` runs one lane in a
child process forked from the process that holds the records: the child reads them copy-on-write
(nothing is pickled on the way in) and sends back each detector's result as plain arrays; the
parent re-attaches its own id index (:func:`rebuild`), so every result reads one index as before.

Fork-safety: every lane process is forked before any lane starts (a lane thread holding a lock at
fork time would leave the child that lock held forever), and a child that finds torch loaded keeps
it to one thread (GNU OpenMP hangs in a forked child whose parent used its thread pool).

:class:`ForkedCall` runs one function the same way (an incremental night builds and stages its
ledger in one while the parent assembles the result).

Fail closed: a detector that raises in a child is raised again in the parent with its own type and
message (the child's traceback attached as a note); a child that dies without a word (killed, out of
memory) fails the run naming its detector and exit code; when another lane fails, the child is
terminated.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pandas as pd

from poisonguard.detectors.base import DetectorResult

#: the ways sanitize.lanes may run detector lanes
MODES = ("auto", "processes", "threads")


def unavailable_reason() -> str | None:
    """Why lanes cannot be forked processes here (None: they can)."""
    if not sys.platform.startswith("linux"):
        return f"forked lane processes need Linux (this is {sys.platform})"
    if mp.current_process().daemon:
        # a Dask worker or another pool's worker: daemonic processes may not have children
        return "this process is a daemonic worker (it may not start child processes)"
    return None


def use_processes(mode: str, n_lanes: int) -> bool:
    """Whether ``n_lanes`` lanes run as forked processes under ``sanitize.lanes = mode``."""
    if mode not in MODES:
        raise ValueError(f"sanitize.lanes must be one of {', '.join(MODES)}, not {mode!r}")
    if n_lanes <= 1 or mode == "threads":
        return False
    reason = unavailable_reason()
    if reason is not None and mode == "processes":
        raise RuntimeError(f"sanitize.lanes = processes, but {reason}; set sanitize.lanes to auto or threads")
    return reason is None


_SERIES = ("scores", "flagged", "review", "evidence")


def compact(res: DetectorResult) -> tuple:
    """A result without its id index (the parent has the same ids: the child checked them)."""
    series = tuple((getattr(res, k).to_numpy(), getattr(res, k).name, getattr(res, k).dtype) for k in _SERIES)
    return res.detector, series, res.findings, res.info


def rebuild(payload: tuple, index: pd.Index) -> DetectorResult:
    """The :class:`DetectorResult` of :func:`compact` over the parent's id ``index``."""
    detector, series, findings, info = payload
    if any(len(values) != len(index) for values, _, _ in series):
        raise ValueError(f"detector {detector!r}: its lane process returned {len(series[0][0])} rows for {len(index)}")
    return DetectorResult(detector, *(pd.Series(values, index=index, name=name, dtype=dtype) for values, name, dtype in series),
                          findings=tuple(findings), info=dict(info))


class ForkedLane:
    """One lane's detectors in a forked child: ``work(name)`` runs a detector there and returns
    ``(result, seconds)``; :meth:`results` yields them in the parent as they arrive."""

    def __init__(self, lane: list[str], work: Callable[[str], tuple[DetectorResult, float]]) -> None:
        ctx = mp.get_context("fork")
        self.lane = list(lane)
        self._recv, send = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_child, args=(self.lane, work, send),
                                 name=f"detector-lane-{self.lane[0]}", daemon=True)
        self._proc.start()
        send.close()   # the child holds the only writer: its exit ends the pipe

    def results(self, index: pd.Index, stop: threading.Event,
                started: Callable[[str], None] | None = None) -> Iterator[tuple[str, DetectorResult, float]]:
        """``(name, result, seconds)`` per detector of the lane, in lane order; returns early when
        ``stop`` is set (another lane failed); raises what the child raised."""
        pending = list(self.lane)
        try:
            while pending:
                if stop.is_set():
                    return
                if not self._recv.poll(0.1):
                    continue
                try:
                    msg = self._recv.recv()
                except EOFError:
                    self._proc.join(5)
                    raise RuntimeError(
                        f"the detector lane process running {pending[0]!r} (pid {self._proc.pid}) ended without "
                        f"a result (exit code {self._proc.exitcode}: killed, or out of memory?)") from None
                if msg[0] == "start":
                    if started is not None:
                        started(msg[1])
                elif msg[0] == "done":
                    _, name, payload, seconds = msg
                    pending.remove(name)
                    yield name, rebuild(payload, index), seconds
                else:
                    raise _raised(*msg[1:], pid=self._proc.pid)
        finally:
            self.close(terminate=bool(pending))

    def close(self, terminate: bool = True) -> None:
        """End the child (terminated when ``terminate``) and release the pipe."""
        if terminate and self._proc.is_alive():
            self._proc.terminate()
        self._proc.join(30)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._recv.close()


def _child(lane: list[str], work: Callable[[str], tuple[DetectorResult, float]], conn: Any) -> None:
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    name = lane[0]
    try:
        for name in lane:
            conn.send(("start", name))
            res, seconds = work(name)
            conn.send(("done", name, compact(res), seconds))
    except BaseException as exc:  # noqa: BLE001 - every failure goes to the parent, which raises it
        conn.send(_error(name, exc))
    finally:
        conn.close()


def _raised(name: str, blob: bytes | None, text: str, tb: str, pid: int | None,
            what: str = "detector lane process", subject: str = "detector") -> BaseException:
    where = f"in the {what} (pid {pid}) running {name!r}" if subject else f"in the {what} (pid {pid})"
    if blob is not None:
        exc = pickle.loads(blob)
        if isinstance(exc, BaseException):
            exc.add_note(f"raised {where}; its traceback:\n{tb}")
            return exc
    return RuntimeError(f"{f'{subject} {name!r}' if subject else name} failed {where}: {text}\n{tb}")


def _error(name: str, exc: BaseException) -> tuple:
    """The message a child sends for ``exc`` (the exception itself when it pickles)."""
    try:
        blob: bytes | None = pickle.dumps(exc)
        pickle.loads(blob)
    except Exception:  # noqa: BLE001 - an exception that does not travel: its type and text do
        blob = None
    return ("error", name, blob, f"{type(exc).__name__}: {exc}", traceback.format_exc())


class ForkedCall:
    """``fn()`` in a forked child that reads the parent's memory copy-on-write, while the parent
    goes on; :meth:`result` waits for it and returns its (picklable) value, or raises what it
    raised (as :class:`ForkedLane` does). Use only where :func:`unavailable_reason` is None and no
    other thread of the parent may hold a lock the child needs."""

    def __init__(self, fn: Callable[[], Any], name: str) -> None:
        ctx = mp.get_context("fork")
        self.name = name
        self._recv, send = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_call_child, args=(fn, name, send), name=f"forked-{name}", daemon=True)
        self._proc.start()
        send.close()

    def result(self) -> Any:
        try:
            try:
                msg = self._recv.recv()
            except EOFError:
                self._proc.join(5)
                raise RuntimeError(f"the process forked for {self.name} (pid {self._proc.pid}) ended without a "
                                   f"result (exit code {self._proc.exitcode}: killed, or out of memory?)") from None
            if msg[0] == "done":
                return msg[1]
            raise _raised(*msg[1:], pid=self._proc.pid, what="forked process", subject="")
        finally:
            self._proc.join(30)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()
            self._recv.close()


def _call_child(fn: Callable[[], Any], name: str, conn: Any) -> None:
    try:
        conn.send(("done", fn()))
    except BaseException as exc:  # noqa: BLE001 - every failure goes to the parent, which raises it
        conn.send(_error(name, exc))
    finally:
        conn.close()
