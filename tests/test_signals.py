"""SIGINT and SIGTERM are honoured within a second in every phase (plgk_cli/signals.py): the
interruptible() guard of every command, replay's StopRequest at an update boundary and, past its
grace period, in the middle of an update; a second signal never cuts the cleanup or the message
short. In-process: the signals are sent to this very process from a timer thread."""

from __future__ import annotations

import os
import signal
import threading
import time

import h5py
import numpy as np
import pytest

from plgk_cli.errors import Interrupted
from plgk_cli.signals import GRACE_SECONDS, StopOverdue, StopRequest, interruptible
from test_cli_errors import assert_nothing_written, base, replay  # noqa: F401 (base: a fixture)


def send_later(seconds: float, *signums) -> threading.Timer:
    def fire():
        for signum in signums:
            os.kill(os.getpid(), signum)
            time.sleep(0.05)
    timer = threading.Timer(seconds, fire)
    timer.start()
    return timer


def busy(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sum(range(1000))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interruptible_raises_once_and_ignores_the_second_signal_during_cleanup(signum):
    previous = signal.getsignal(signum)
    cleaned = False
    with pytest.raises(KeyboardInterrupt):
        with interruptible():
            send_later(0.1, signum)
            try:
                busy(5)
            finally:
                os.kill(os.getpid(), signum)  # a second Ctrl-C while cleaning up: ignored
                busy(0.2)
                cleaned = True
    assert cleaned
    assert signal.getsignal(signum) is previous


def test_stop_request_waits_for_the_boundary():
    with StopRequest() as stop:
        send_later(0.05, signal.SIGTERM)
        busy(0.3)  # shorter than the grace period: no interruption, only the request
        assert stop.requested
        signal.setitimer(signal.ITIMER_REAL, 0)  # the walk would now commit and stop


def test_stop_request_interrupts_past_its_grace_period():
    start = None
    with pytest.raises(StopOverdue):
        with StopRequest():
            send_later(0.05, signal.SIGINT)
            start = time.monotonic()
            busy(10)
    assert time.monotonic() - start < GRACE_SECONDS + 0.5


def test_second_signal_interrupts_at_once():
    with pytest.raises(KeyboardInterrupt) as caught:
        with StopRequest():
            send_later(0.05, signal.SIGINT, signal.SIGINT)
            busy(10)
    assert not isinstance(caught.value, StopOverdue)


def test_no_signal_lands_inside_a_commit():
    finished = []
    with pytest.raises(KeyboardInterrupt):
        with StopRequest() as stop:
            send_later(0.05, signal.SIGINT, signal.SIGINT)
            with stop.committing():
                busy(0.5)  # both signals arrive here; the commit completes first
                finished.append(True)
    assert finished == [True]


def test_replay_stops_within_a_second_in_a_long_update(base, tmp_path):
    """supersample:4096 makes one update of the tiny run last about a second; a SIGINT in it
    ends the replay (exit 130, one line) within the grace period, nothing written, and a run
    again gives the uninterrupted result."""
    out, reference = tmp_path / "out.h5", tmp_path / "reference.h5"
    timer = send_later(0.3, signal.SIGINT)
    start = time.monotonic()
    result = replay(base["run"], "--rule", "supersample:4096", "--commit-seconds", "1000", out=out)
    elapsed = time.monotonic() - start
    timer.join()
    assert result.exit_code == Interrupted.exit_code, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("plgk: error: replay stopped during update"), lines
    assert "nothing was committed yet" in lines[0]
    assert elapsed < 0.3 + GRACE_SECONDS + 0.7, elapsed
    assert_nothing_written(out)
    again = replay(base["run"], "--rule", "supersample:16", out=out)
    assert again.exit_code == 0, again.stderr
    assert replay(base["run"], "--rule", "supersample:16", out=reference).exit_code == 0
    with h5py.File(out) as a, h5py.File(reference) as b:
        np.testing.assert_array_equal(a["audit/loss/influence"][()], b["audit/loss/influence"][()])


def test_a_signal_inside_a_checkpoint_read_is_not_a_corrupt_file(base, monkeypatch):
    """safetensors wraps a KeyboardInterrupt raised inside its reader in an error of its own; once
    a signal has stopped the command, the reader lets the interruption through instead of calling
    the step file truncated or corrupt (which would send the user to restore a good file)."""
    from plgk_cli import signals, trajectory
    from plgk_cli.errors import TrajectoryError

    def wrapped_interrupt(*args, **kwargs):
        raise RuntimeError("could not determine the shape of object type 'torch.storage.UntypedStorage'")

    monkeypatch.setattr(trajectory, "safe_open", wrapped_interrupt)
    with pytest.raises(TrajectoryError, match="truncated or corrupt"):  # no signal: a damaged file
        trajectory.read_checkpoint(base["run"], 1)
    monkeypatch.setattr(signals, "_stopping", True)
    with pytest.raises(KeyboardInterrupt):
        trajectory.read_checkpoint(base["run"], 1)
    with pytest.raises(KeyboardInterrupt):  # the header-only reader of plgk check too
        trajectory.checkpoint_run_id(base["run"], 1)
