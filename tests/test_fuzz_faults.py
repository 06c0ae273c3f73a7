"""The fuzz suite's faults (issue 17) that need processes of their own: two commands racing for one
new --out, SIGINT/SIGTERM in each phase (train, replay's walk, a long supersample step), a second
Ctrl-C, SIGKILL during training. Each runs `python -m plgk_cli` in a child with a timeout on every
wait, so a hang fails instead of hanging CI. Marked slow: `pytest -m 'not slow'` leaves them out,
CI runs them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fuzz import Case, build_shared, record
from test_cli_errors import CONFIG, invoke
from test_resume import assert_same_file

pytestmark = pytest.mark.slow

WAIT = 120  # seconds any child may take before the test calls it a hang
SIGNAL_DEADLINE = 1.0  # a handled signal ends the command within this many seconds
FAULT_GROUPS = {  # id -> (page group, input), for docs/bad-inputs.md
    "race-two-trains-one-out": ("outputs and races", "two `plgk train` at once on one new --out (the second)"),
    "race-two-replays-one-out": ("outputs and races", "two `plgk replay` at once on one new --out (the second)"),
    "signal-int-train": ("signals", "SIGINT during `plgk train`"),
    "signal-term-train": ("signals", "SIGTERM during `plgk train`"),
    "signal-int-replay-walk": ("signals", "SIGINT during replay's walk"),
    "signal-term-replay-walk": ("signals", "SIGTERM during replay's walk"),
    "signal-term-supersample-step": ("signals", "SIGTERM inside one long `--rule supersample:2048` step"),
    "signal-second-int": ("signals", "a second Ctrl-C shortly after the first, during `plgk train`"),
    "kill-train-then-resume": ("signals", "SIGKILL during `plgk train`, then `plgk check` (before `--resume`)"),
}
FAULT_IDS = tuple(FAULT_GROUPS)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    shared = build_shared(root)
    long_config = root / "long.toml"  # 20 examples, batch 8, 60 epochs: 180 updates
    long_config.write_text(CONFIG.format(npz=shared["npz"]).replace("epochs = 1", "epochs = 60"))
    shared["long_config"] = long_config
    shared["long_run"] = root / "long_run"
    done = plgk("train", "--config", long_config, "--out", shared["long_run"], "--quiet").wait(WAIT)
    assert done == 0
    return shared


def plgk(*args, env=None) -> subprocess.Popen:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PLGK_FAULT")}
    environment.update(env or {})
    return subprocess.Popen([sys.executable, "-m", "plgk_cli", *map(str, args)], env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=WAIT)
    return proc.returncode, out, err


def one_line(err: str) -> str:
    assert "Traceback" not in err and "Aborted!" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("plgk: "), err
    return lines[0]


def wait_for(condition, what: str, timeout: float = WAIT) -> None:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"timed out waiting for {what}"
        time.sleep(0.02)


def signal_and_time(proc: subprocess.Popen, how: signal.Signals) -> tuple[float, int, str]:
    start = time.monotonic()
    proc.send_signal(how)
    rc, _, err = finish(proc)
    return time.monotonic() - start, rc, err


def note(id, argv, line, exit_code, roots) -> None:
    group, what = FAULT_GROUPS[id]
    record(Case(id, group, what, tuple(map(str, argv)), exit_code), list(map(str, argv)), [line], exit_code, roots)


def check_ok(run: Path) -> None:
    """`plgk check` of the run passes (in this process: a child would only add torch's import)."""
    result = invoke("check", run)
    assert result.exit_code == 0 and result.stdout.strip().endswith("ok"), result.stderr


def test_two_trains_on_one_new_out(shared, tmp_path):
    out = tmp_path / "run"
    argv = ("train", "--config", shared["config"], "--out", out, "--quiet")
    results = [finish(p) for p in [plgk(*argv), plgk(*argv)]]
    codes = sorted(rc for rc, _, _ in results)
    assert codes == [0, 14], results
    loser = next(err for rc, _, err in results if rc == 14)
    line = one_line(loser)
    assert str(out) in line, line
    check_ok(out)
    note("race-two-trains-one-out", argv, line, 14, [tmp_path, shared["root"]])


def test_two_replays_on_one_new_out(shared, tmp_path):
    out = tmp_path / "out.h5"
    argv = ("replay", "--ckpts", shared["long_run"], "--audit-set", "test[:4]", "--out", out, "--quiet")
    results = [finish(p) for p in [plgk(*argv), plgk(*argv)]]
    assert sorted(rc for rc, _, _ in results) == [0, 14], results
    line = one_line(next(err for rc, _, err in results if rc == 14))
    assert str(out) in line, line
    result = invoke("inspect", out)
    assert result.exit_code == 0, result.stderr
    assert not [p for p in tmp_path.iterdir() if p != out], list(tmp_path.iterdir())
    note("race-two-replays-one-out", argv, line, 14, [tmp_path, shared["root"]])


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM], ids=["int", "term"])
def test_signal_during_train_then_resume(shared, tmp_path, how):
    out = tmp_path / "run"
    argv = ("train", "--config", shared["long_config"], "--out", out, "--quiet")
    proc = plgk(*argv)
    wait_for(lambda: len(list(out.glob("step_*.safetensors"))) >= 3, "training to start")
    elapsed, rc, err = signal_and_time(proc, how)
    line = one_line(err)
    assert rc == 130 and "--resume" in line, (rc, err)
    assert elapsed < SIGNAL_DEADLINE, f"exited {elapsed:.2f} s after the signal"
    if how == signal.SIGINT:  # the run left behind is whole: it resumes (SIGTERM stops it the same way)
        rc, _, err = finish(plgk(*argv, "--resume"))
        assert rc == 0, err
        check_ok(out)
    name = "int" if how == signal.SIGINT else "term"
    note(f"signal-{name}-train", argv, line, 130,
         [tmp_path, shared["root"]])


@pytest.fixture(scope="module")
def long_reference(shared, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "reference.h5"
    rc, _, err = finish(plgk("replay", "--ckpts", shared["long_run"], "--audit-set", "test[:4]", "--out", out,
                             "--quiet", "--commit-every", "1", "--threads", "1"))
    assert rc == 0, err
    return out


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM], ids=["int", "term"])
def test_signal_during_replay_walk_then_resume(shared, long_reference, tmp_path, how):
    out = tmp_path / "out.h5"
    argv = ("replay", "--ckpts", shared["long_run"], "--audit-set", "test[:4]", "--out", out, "--quiet",
            "--commit-every", "1", "--threads", "1")
    proc = plgk(*argv)
    wait_for(lambda: Path(f"{out}.progress").exists(), "the first progress commit")
    elapsed, rc, err = signal_and_time(proc, how)
    line = one_line(err)
    assert rc == 130 and "--resume" in line, (rc, err)
    assert elapsed < SIGNAL_DEADLINE, f"exited {elapsed:.2f} s after the signal"
    rc, _, err = finish(plgk(*argv, "--resume"))
    assert rc == 0, err
    assert_same_file(long_reference, out)
    name = "int" if how == signal.SIGINT else "term"
    note(f"signal-{name}-replay-walk", argv, line, 130,
         [tmp_path, shared["root"]])


def test_signal_during_a_long_supersample_step(shared, tmp_path):
    """One update of --rule supersample:2048 takes more than a second: the signal must not wait for
    it. The update is abandoned and the progress stays at the commit before it, from which --resume
    finishes (that a resumed replay equals an uninterrupted one is held by the walk's tests above
    and by tests/test_signals.py)."""
    out = tmp_path / "out.h5"
    base = ("replay", "--ckpts", shared["run"], "--audit-set", "test[:4]", "--quiet", "--rule", "supersample:2048",
            "--commit-every", "1", "--threads", "1")
    argv = base + ("--out", out)
    proc = plgk(*argv)
    wait_for(lambda: Path(f"{out}.progress").exists(), "the first progress commit")
    time.sleep(0.2)  # inside the next, long step
    elapsed, rc, err = signal_and_time(proc, signal.SIGTERM)
    line = one_line(err)
    assert rc == 130, (rc, err)
    assert elapsed < SIGNAL_DEADLINE, f"exited {elapsed:.2f} s after the signal"
    assert "replay stopped during update" in line and "continue with --resume" in line, line
    rc, _, err = finish(plgk(*argv, "--resume"))
    assert rc == 0, err
    note("signal-term-supersample-step", argv, line, 130, [tmp_path, shared["root"]])


def test_second_ctrl_c(shared, tmp_path):
    out = tmp_path / "run"
    argv = ("train", "--config", shared["long_config"], "--out", out, "--quiet")
    proc = plgk(*argv)
    wait_for(lambda: len(list(out.glob("step_*.safetensors"))) >= 3, "training to start")
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    rc, _, err = finish(proc)
    assert time.monotonic() - start < SIGNAL_DEADLINE + 0.05
    line = one_line(err)
    assert rc == 130 and line.startswith("plgk: interrupted; "), (rc, err)
    note("signal-second-int", argv, line,
         130, [tmp_path, shared["root"]])


def test_kill_during_train_then_resume(shared, tmp_path):
    out = tmp_path / "run"
    argv = ("train", "--config", shared["long_config"], "--out", out, "--quiet")
    rc, _, err = finish(plgk(*argv, env={"PLGK_FAULT": "after_checkpoint:20:KILL"}))
    assert rc == -signal.SIGKILL, (rc, err)
    result = invoke("check", out)
    rc, check_err = result.exit_code, result.stderr
    assert rc == 12 and "--resume" in check_err, (rc, check_err)
    rc, _, err = finish(plgk(*argv, "--resume"))
    assert rc == 0, err
    check_ok(out)
    lines = "\n".join(line for line in check_err.splitlines() if line.strip())
    note("kill-train-then-resume", ("check", out), lines, 12, [tmp_path, shared["root"]])
