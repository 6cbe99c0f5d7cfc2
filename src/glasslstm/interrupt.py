"""Stopping a training run cleanly on a signal: finish the step, save, say how to continue.

The signals that ask a process to stop are handled alike: SIGINT (Ctrl-C), SIGTERM (what
``kill``, ``docker stop`` and batch schedulers send) and SIGHUP (the terminal was closed).
The first one only sets a flag, which the training loop reads between steps; a second one
stops at once (KeyboardInterrupt). On SIGHUP a terminal that is gone cannot take output any
more (writing to it fails with EIO), so the standard streams that were that terminal are
pointed at /dev/null first: the save that follows must not fail on a progress bar update.
(A terminal that hung up no longer answers as one; a SIGHUP sent by hand to a run whose
terminal is still there leaves its output alone.)
"""

from __future__ import annotations

import os
import signal
import threading

STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)


class GracefulStop:
    """A context in which the stop signals set :attr:`requested` instead of killing.

    ``signum`` is the first signal received (0: none) and :attr:`name` its name; the
    conventional exit status of a process stopped by it is ``128 + signum``. Outside the
    main thread (where Python cannot set handlers) it does nothing.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signum = 0
        self._previous: dict[int, object] = {}
        self._terminals: tuple[int, ...] = ()  # stdout/stderr when they were a terminal

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def __enter__(self) -> GracefulStop:
        self._terminals = tuple(fd for fd in (1, 2) if _isatty(fd))
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum
        if signum == getattr(signal, "SIGHUP", None):
            _detach_from_terminal([fd for fd in self._terminals if not _isatty(fd)])

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)  # type: ignore[arg-type]
        self._previous.clear()


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def _detach_from_terminal(fds: list[int]) -> None:
    """Point ``fds`` (standard streams whose terminal hung up) at /dev/null."""
    if not fds:
        return
    try:
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    try:
        for fd in fds:
            try:
                os.dup2(null, fd)
            except OSError:
                continue
    finally:
        os.close(null)
