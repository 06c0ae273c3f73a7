"""SIGINT and SIGTERM: honoured within a second in every phase of a command.

A command runs under ``interruptible()``: either signal raises KeyboardInterrupt where it lands
(every file plgk writes is renamed into place whole, so the run directory or output stays
consistent and `plgk train --resume` continues), and any further signal is ignored until the
command has cleaned up and said so, so that a second Ctrl-C cannot cut the cleanup or the message
short. Replay's walk uses ``StopRequest`` instead, which asks the walk to commit its progress at
the next update boundary; if the boundary is not reached within GRACE_SECONDS (a long
supersample:K update), or a second signal arrives, it interrupts at once and the progress stays at
the previous commit.
"""

from __future__ import annotations

import contextlib
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)
GRACE_SECONDS = 0.5  # from the signal to the stop: the walk's boundary, or at once


class StopOverdue(KeyboardInterrupt):
    """The walk did not reach an update boundary within GRACE_SECONDS of the stop request."""


_stopping = False  # a signal has asked the command to stop (whatever a library made of it since)


def stopping() -> bool:
    """Whether SIGINT or SIGTERM has stopped the command: a reader that sees an error where the
    signal landed (safetensors wraps the KeyboardInterrupt in its own error) must not report the
    file it was reading as damaged, but let the interruption through (raise KeyboardInterrupt)."""
    return _stopping


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _raise_once(signum, frame):
    global _stopping
    _stopping = True
    ignore()  # a second signal must not interrupt the cleanup this one starts
    raise KeyboardInterrupt


def ignore() -> None:
    """Ignore SIGINT and SIGTERM from now on (until the enclosing ``interruptible`` ends)."""
    if _in_main_thread():
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def interruptible():
    """SIGINT and SIGTERM raise KeyboardInterrupt, once; the previous handlers come back after."""
    if not _in_main_thread():
        yield
        return
    global _stopping
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    for sig in SIGNALS:
        signal.signal(sig, _raise_once)
    try:
        yield
    finally:
        _stopping = False
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class StopRequest:
    """The first SIGINT/SIGTERM sets ``requested``: the walk commits at the next update boundary
    and stops. StopOverdue is raised if that takes longer than GRACE_SECONDS; a second signal
    raises KeyboardInterrupt at once. Neither lands inside ``committing()``, whose file must be
    renamed into place whole: they are raised as it ends."""

    def __init__(self):
        self.requested = False
        self._committing = False
        self._pending: BaseException | None = None

    def __enter__(self):
        self._main = _in_main_thread()
        if self._main:
            self._previous = {sig: signal.getsignal(sig) for sig in (*SIGNALS, signal.SIGALRM)}
            for sig in SIGNALS:
                signal.signal(sig, self._handle)
            signal.signal(signal.SIGALRM, self._overdue)
        return self

    def _interrupt(self, exc: BaseException) -> None:
        global _stopping
        _stopping = True
        if self._committing:
            self._pending = exc
            return
        ignore()
        signal.setitimer(signal.ITIMER_REAL, 0)
        raise exc

    def _handle(self, signum, frame):
        if self.requested:
            self._interrupt(KeyboardInterrupt())
        self.requested = True
        signal.setitimer(signal.ITIMER_REAL, GRACE_SECONDS)

    def extend(self, seconds: float) -> None:
        """The stop requested is acted on ``seconds`` from now (a torchrun rank's, which every rank
        acts on at the next boundary): GRACE_SECONDS counts from then."""
        if self.requested and self._main:
            signal.setitimer(signal.ITIMER_REAL, seconds + GRACE_SECONDS)

    def _overdue(self, signum, frame):
        self._interrupt(StopOverdue())

    @contextlib.contextmanager
    def committing(self):
        self._committing = True
        try:
            yield
        finally:
            self._committing = False
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._interrupt(pending)

    def __exit__(self, *exc):
        global _stopping
        _stopping = False  # the stop has been raised: what reads on is no longer interrupted
        if self._main:
            signal.setitimer(signal.ITIMER_REAL, 0)
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
