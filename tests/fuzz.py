"""The fuzz suite's harness (issue 17): a bad input or fault as a `Case`, and `run_case`, which
runs it through the CLI in-process and holds it to the error contract.

A case builds its inputs in a scratch folder from the shared, trained fixtures (`build_shared`),
runs one `plgk` command and asserts: its exit code; exactly one non-empty stderr line starting
`plgk: error: ` (`plgk check`: `plgk: problem:` lines, then the summary) that names every needle;
no traceback anywhere; no hang (a watchdog stops a case that runs past its time); and that nothing
written before changed: every file of the scratch folder and of the shared fixtures keeps its bytes
and mode, and no file appears that the case does not allow (a replay leaves no OUT.* behind).

With PLGK_FUZZ_RECORD=FILE set, every case appends what it printed to FILE (one JSON object a
line; FILE.<worker> under pytest-xdist), from which scripts/bad_inputs_page.py writes
docs/bad-inputs.md.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from test_cli_errors import invoke, train_run, write_config, write_npz

# The exit codes a plgk command may end with: success, click's usage errors, and the PlgkError
# subclasses' codes (plgk_cli/errors.py); anything else (1: an unexpected exception) is a bug.
DOCUMENTED_EXIT_CODES = frozenset({0, 2, *range(10, 21), 130})

RECORD_ENV = "PLGK_FUZZ_RECORD"
RUN_ID = re.compile(r"(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f])")


class CaseHung(Exception):
    """Raised by the watchdog in a case that ran past its time limit."""


@dataclass(frozen=True)
class Case:
    """One bad input or fault. ``argv``, ``needles`` and ``may_create`` may hold placeholders,
    ``{name}``, filled from the scratch folder's paths (`Scratch.paths`)."""

    id: str                               # unique, kebab-case; the pytest id and the page's test column
    group: str                            # the page section it is listed under
    what: str                             # one sentence: the page's "input" column
    argv: tuple                           # the plgk arguments
    exit: int                             # the expected exit code
    needles: tuple = ()                   # what the line must name: file, key, option or value
    setup: Callable | None = None         # setup(scratch): builds the inputs
    fault: Callable | None = None         # fault(monkeypatch, scratch): an injected failure, in-process
    env: dict = field(default_factory=dict)
    may_create: tuple = ()                # paths (or folders) the failing command may leave new files in
    chdir: bool = False                   # run in the scratch folder (user code imported from there)
    timeout: float = 30.0                 # the watchdog's limit, seconds


class Scratch:
    """A case's scratch folder and the paths its placeholders name."""

    def __init__(self, tmp: Path, shared: dict, case_id: str):
        self.tmp, self.shared = tmp, shared
        self.module_name = "fz_" + case_id.replace("-", "_")
        self.paths = {"tmp": tmp, "out": tmp / "out.h5", "outdir": tmp / "newrun",
                      "module": self.module_name, **shared}

    def __getitem__(self, name: str) -> Path:
        return self.paths[name]

    def fill(self, text: str) -> str:
        return text.format_map({k: str(v) for k, v in self.paths.items()})

    def copy_run(self, name: str = "run") -> Path:
        """A copy of a shared run for a case that damages it; {run} names the copy from here on."""
        copy = Path(shutil.copytree(self.shared[name], self.tmp / "run"))
        self.paths["run"] = copy
        return copy

    def copy(self, name: str, as_name: str | None = None) -> Path:
        """A copy of a shared file; the placeholder ``name`` names the copy from here on."""
        copy = Path(shutil.copy(self.shared[name], self.tmp / (as_name or Path(self.shared[name]).name)))
        self.paths[name] = copy
        return copy

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return path

    def config(self, edit: Callable[[str], str] | None = None, npz: Path | None = None,
               name: str = "bad.toml") -> Path:
        """The shared run's config (on ``npz`` if given) with ``edit`` applied; {config} names it."""
        text = self.shared["config"].read_text()
        if npz is not None:
            text = text.replace(str(self.shared["npz"]), str(npz))
        out = edit(text) if edit else text
        path = self.write(name, out)
        self.paths["config"] = path
        return path

    def npz(self, name: str = "data.npz", **arrays) -> Path:
        """An .npz of the shared data's arrays, some replaced (``None``: left out)."""
        with np.load(self.shared["npz"]) as f:
            base = {k: f[k] for k in f.files}
        base.update(arrays)
        path = self.tmp / name
        np.savez(path, **{k: v for k, v in base.items() if v is not None})
        return path

    def arrays(self) -> dict:
        with np.load(self.shared["npz"]) as f:
            return {k: f[k] for k in f.files}

    def module_file(self, source: str) -> str:
        """Write the case's own Python module into the scratch folder; returns its import name."""
        self.write(self.module_name + ".py", source)
        return self.module_name

    def train(self, config: Path, out: Path, *extra) -> Path:
        result = invoke("train", "--config", config, "--out", out, "--quiet", *extra)
        assert result.exit_code == 0, ("setup: train failed", result.stderr)
        return out

    def replay(self, run: Path, out: Path, *extra, audit_set: str = "test[:4]") -> Path:
        result = invoke("replay", "--ckpts", run, "--audit-set", audit_set, "--out", out, "--quiet", *extra)
        assert result.exit_code == 0, ("setup: replay failed", result.stderr)
        return out


def build_shared(root: Path) -> dict:
    """What the cases share, trained once per module: the tiny run of test_cli_errors (20 train /
    8 test, 6 features, 3 classes, 3 adam updates, float64), a second run of the same config
    (another run_id), a replay of the first (test[:4], loss) and one of its logits."""
    npz = write_npz(root / "data.npz")
    config = write_config(root / "run.toml", npz)
    run = train_run(config, root / "run")
    other = train_run(config, root / "other")
    h5 = root / "influences.h5"
    logits_h5 = root / "logits.h5"
    for out, target in ((h5, "loss"), (logits_h5, "logits")):
        result = invoke("replay", "--ckpts", run, "--audit-set", "test[:4]", "--out", out,
                        "--target", target, "--quiet")
        assert result.exit_code == 0, result.stderr
    return {"root": root, "npz": npz, "config": config, "run": run, "other": other, "h5": h5,
            "logits_h5": logits_h5}


def interrupted_progress(shared: dict) -> Path:
    """The progress file of a replay of the shared run stopped by SIGTERM after its first commit
    (`--target loss --commit-every 1`), made once in a child process: a signal to this process
    would reach pytest."""
    progress = shared["root"] / "interrupted" / "out.h5.progress"
    if not progress.exists():
        progress.parent.mkdir(exist_ok=True)
        env = {**os.environ, "PLGK_FAULT": "after_commit:1:TERM"}
        env.pop("PLGK_FAULT_COUNT", None)
        child = subprocess.run([sys.executable, "-m", "plgk_cli", "replay", "--ckpts", str(shared["run"]),
                                "--audit-set", "test[:4]", "--out", str(progress.parent / "out.h5"),
                                "--quiet", "--commit-every", "1"],
                               env=env, capture_output=True, text=True, timeout=120)
        assert child.returncode == 130 and progress.exists(), child.stderr
    return progress


# --------------------------------------------------------------------------- the contract


def snapshot(roots) -> dict:
    """Every file under ``roots``: path -> (bytes, mode); bytecode caches left out."""
    files = {}
    for root in roots:
        root = Path(root)
        if not root.exists():
            continue
        for p in sorted(root.rglob("*")):
            if "__pycache__" in p.parts or p.is_dir():
                continue
            files[p] = (p.read_bytes(), p.lstat().st_mode) if p.is_file() else (None, p.lstat().st_mode)
    return files


def _allowed(path: Path, allowed: list) -> bool:
    return any(path == a or a in path.parents for a in allowed)


def assert_nothing_changed(before: dict, after: dict, allowed: list, out: Path) -> None:
    changed = [str(p) for p, (data, mode) in before.items()
               if p not in after or after[p] != (data, mode)]
    assert not changed, f"written before, changed or removed: {changed}"
    new = [str(p) for p in after if p not in before and not _allowed(p, allowed)]
    assert not new, f"left behind: {new}"
    leftovers = [str(p) for p in out.parent.glob(out.name + ".*")
                 if p not in before and not _allowed(p, allowed)]
    assert not leftovers, f"replay leftovers: {leftovers}"


def error_lines(result, command: str) -> list:
    """The stderr lines the contract allows for ``command``, checked; returns them."""
    text = result.output + (result.stderr or "")
    assert "Traceback" not in text, text
    assert "Aborted!" not in text, text
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if command == "check":
        assert len(lines) >= 2, result.stderr
        assert all(line.startswith("plgk: problem: ") for line in lines[:-1]), result.stderr
        assert re.fullmatch(r".*: \d+ problems?", lines[-1]), lines[-1]
    else:
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("plgk: error: "), lines[0]
    return lines


def shorten(text: str, roots) -> str:
    """Temporary paths as `…/NAME`, run ids as their first 8 characters."""
    for root in sorted({str(r) for r in roots}, key=len, reverse=True):
        text = text.replace(root, "…")
    return RUN_ID.sub(lambda m: m.group()[:8] + "…", text)


def render_command(argv: list, env: dict) -> str:
    words = [a if a and not re.search(r"\s", a) else repr(a) for a in argv]
    prefix = "".join(f"{k}={v} " for k, v in env.items())
    return prefix + "plgk " + " ".join(words)


def record(case: Case, argv: list, lines: list, exit_code: int, roots) -> None:
    target = os.environ.get(RECORD_ENV)
    if not target:
        return
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    path = Path(f"{target}.{worker}" if worker else target)
    entry = {"id": case.id, "group": case.group, "what": case.what,
             "command": shorten(render_command(argv, case.env), roots),
             "line": shorten("\n".join(lines), roots), "exit": exit_code}
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(json.dumps(entry, ensure_ascii=False) + "\n")


def _hung(signum, frame):
    raise CaseHung("the command ran past the case's time limit (a hang)")


def run_case(case: Case, tmp_path: Path, shared: dict):
    """Build the case's inputs, run it in-process and assert the contract; returns the result."""
    scratch = Scratch(tmp_path, shared, case.id)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "dont_write_bytecode", True)
        if case.chdir:
            mp.chdir(tmp_path)
        if case.setup:
            case.setup(scratch)
        argv = [scratch.fill(str(a)) for a in case.argv]
        roots = [tmp_path, shared["root"]]
        before = snapshot(roots)
        for key, value in case.env.items():
            mp.setenv(key, value)
        if case.fault:
            case.fault(mp, scratch)
        previous = signal.signal(signal.SIGALRM, _hung)
        signal.setitimer(signal.ITIMER_REAL, case.timeout)
        try:
            result = invoke(*argv)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    for name in [m for m in sys.modules if m == scratch.module_name or m.startswith(scratch.module_name + ".")]:
        del sys.modules[name]
    if isinstance(result.exception, CaseHung):
        pytest.fail(f"{case.id}: hung (no exit within {case.timeout} s)")
    lines = error_lines(result, argv[0])
    assert result.exit_code == case.exit, (result.exit_code, result.stderr)
    text = "\n".join(lines)
    for needle in case.needles:
        assert scratch.fill(needle) in text, (scratch.fill(needle), text)
    after = snapshot(roots)
    allowed = [Path(scratch.fill(p)) for p in case.may_create]
    assert_nothing_changed(before, after, allowed, scratch["out"])
    record(case, argv, lines, result.exit_code, roots)
    return result


def assert_documented_outcome(result) -> None:
    """A fuzzed input's outcome: success, or the contract's one line and a documented code."""
    text = result.output + (result.stderr or "")
    assert "Traceback" not in text, text
    assert isinstance(result.exception, (SystemExit, type(None))), repr(result.exception)
    assert result.exit_code in DOCUMENTED_EXIT_CODES - {2}, (result.exit_code, text)
    if result.exit_code:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("plgk: error: "), result.stderr

