"""Write docs/bad-inputs.md from the fuzz suite (tests/test_fuzz.py, tests/test_fuzz_faults.py).

Runs the suite with PLGK_FUZZ_RECORD set, so that every case that holds to the contract records
its command, the line plgk printed and the exit code, and writes one table per group. `--fast`
leaves the slow fault tests out and keeps their rows from the current page. Nothing on the page is
written by hand but its fixed text (HEAD, TAIL below), so no row can go stale.

    python scripts/bad_inputs_page.py [--fast]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "bad-inputs.md"
GROUPS = ("plgk train: config", "plgk train: data", "user code", "non-finite numbers", "plgk replay: options",
          "plgk replay: audit set", "plgk replay: train subset", "plgk replay: the run directory", "plgk check",
          "plgk inspect", "outputs and races", "disk and permissions", "signals")

HEAD = """\
# Bad inputs: what plgk says, and which test holds it to that

Every input a user can get wrong gets **one line on stderr** — `plgk: error: <what, where, how
to fix it>`, naming the file, key or value — and the **exit code of its error class**; never a
traceback, and nothing already written is lost (a failing `replay --overwrite` leaves the old
output as it was, a failing `train` leaves `--out` as it was, `check` and `inspect` change nothing).
`plgk check` is the one command that prints several lines: one `plgk: problem: …` line per
problem, then a summary.

The tables of [the fuzz suite](#the-fuzz-suite) are written by `scripts/bad_inputs_page.py` from
`tests/test_fuzz.py` and `tests/test_fuzz_faults.py`: each row is a case that the suite ran, with
the message it printed (temporary paths shortened to `…/`, run ids to their first 8 characters;
the tests pass `--quiet`, kept in the commands).

## Exit codes

The codes come from `plgk_cli/errors.py` (each `PlgkError` subclass has its `exit_code`). They start
at 10 so that they never collide with click's usage errors (2) or an unexpected Python exception (1).

| code | meaning |
|---|---|
| 0 | success (`plgk check`: the run is ok) |
| 1 | an unexpected exception (a bug: the traceback is printed), or any error under `--debug` |
| 2 | click usage error: unknown option, missing required option, a value of the wrong type or outside a `click.Choice` |
| 10 | `ConfigError`: the run configuration (file, TOML, section, key, value, combination, model kwargs, a model output without one row per example, the `[task]`, `[checkpoint] every` > 1 for a model with dropout or BatchNorm; `--device cuda` without CUDA; `plgk train --threads`) |
| 11 | `DataError`: the dataset (missing, unreadable, wrong arrays, NaN or Inf in it, targets the task refuses, changed since training) |
| 12 | `TrajectoryError`: the run directory (manifest, its checksum and fields, checkpoints, their contents) |
| 13 | `AuditSpecError`: replay and inspect arguments (`--audit-set`, `--train-subset`, `--target` (also one the run's task does not offer), `--group-by label` without class labels, `--rule`, `--stride`, `--chunk-size`, `--memory-budget`, `--threads`, `--accept-update-error`, `--ghost`, the kernel and modes options, `--commit-every`/`--commit-seconds`, `--audit`, `--top`, `--class`; `--resume` with other arguments) |
| 14 | `OutputError`: where the output goes (`--out` exists, is a directory, is inside an input, is not writable, the disk is full; an interrupted replay's progress is in the way; another command writes the same `--out`) |
| 15 | `StoreError`: an `influences.h5` or a replay progress file that cannot be read as one |
| 16 | `RecorderError`: a training loop that broke the Recorder's protocol (also: a buffer changed outside the forward, two random or buffer-changing forwards in one update, a random or buffer-changing forward with `checkpoint_every` > 1; `plgk train --resume` of a finished run) |
| 17 | `DependencyError`: an optional package the feature needs is missing |
| 18 | `UpdateCheckError`: replay re-derived an update that differs from the recorded one by more than `--accept-update-error` (or, with dropout or BatchNorm, the replayed training forward misses the record): the audit would not describe the run |
| 19 | `UserCodeError`: your own code raised (a model builder `pkg.mod:fn`, a `py:` dataset or task, a custom model's forward); the line names your file and line and the exception |
| 20 | `NonFiniteError`: a NaN or Inf where a finite number is needed (a diverged training step; `plgk train --allow-nonfinite` records it anyway; a non-finite audit quantity) |
| 130 | interrupted (SIGINT/SIGTERM, `Interrupted`): progress was committed; `plgk replay --resume` or `plgk train --resume` continues. A second Ctrl-C prints the same `plgk: interrupted; …` line and exits 130 too |

`plgk check` exits with the largest code among the problems it found (a run with a gap, code 12,
and changed data, code 11, exits 12).

## `--debug`

`plgk --debug COMMAND ...` (before the command) lets the error through instead: Python prints the
traceback ending in the `PlgkError` and the exit code is 1. Use it to report a bug or to see where a
message comes from; the one-line message is the last line of the traceback.

## The fuzz suite

Each row is one case of `tests/test_fuzz.py::test_case[ID]` (the test column gives the ID), or of
`tests/test_fuzz_faults.py` (signals and races, in child processes; marked `slow`). Every case
also checks that no file written before the command changed (bytes and mode) and that a failing
replay leaves no `OUT.*` behind. Hypothesis adds, over random input, that every `--audit-set`,
`--rule` and `--train-subset` spec and every TOML value of a config key ends in success or one line
with a documented exit code, and that `plgk check` of a manifest holding any JSON value lists
problems, never a traceback (`test_hypothesis_*`).
"""


TAIL = """
## More bad inputs, held by other tests

The tests of each module hold the same contract for the inputs of their own stage, each asserting
the exit code, the one line and that nothing written before changed: `tests/test_cli_errors.py` and
`tests/test_bad_inputs.py` (the first sets, from which the fuzz suite grew), `tests/test_outputs.py`
(claims, races, inputs as outputs, full disks, umask, damaged HDF5 files), `tests/test_manifest.py`
(the manifest's checksum and schema, with a hypothesis fuzz of `plgk check` and replay),
`tests/test_user_code.py`, `tests/test_nonfinite.py`, `tests/test_signals.py`,
`tests/test_arguments.py`, `tests/test_resume.py` and `tests/test_train_resume.py`.
"""


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def code(text: str) -> str:
    return "<br>".join(f"`` {cell(line)} ``" for line in text.splitlines()) if text else "—"


def run_suite(record: Path, fast: bool) -> int:
    files = ["tests/test_fuzz.py"] + ([] if fast else ["tests/test_fuzz_faults.py"])
    env = {**os.environ, "PLGK_FUZZ_RECORD": str(record)}
    return subprocess.run([sys.executable, "-m", "pytest", *files, "-p", "no:xdist", "-q",
                           "-p", "no:cacheprovider"], cwd=REPO, env=env).returncode


def read_records(record: Path) -> dict:
    entries = {}
    for path in [record, *record.parent.glob(record.name + ".*")]:
        if path.exists():
            for line in path.read_text().splitlines():
                entry = json.loads(line)
                entries[entry["id"]] = entry
    return entries


def kept_rows(page: str, ids) -> dict:
    """Rows of the current page for ``ids`` (the fault cases, under --fast): id -> (group, row)."""
    rows, group = {}, None
    for line in page.splitlines():
        if line.startswith("### "):
            group = line[4:].strip()
        m = re.search(r"\| `([a-z0-9-]+)` \|$", line)
        if m and m[1] in ids:
            rows[m[1]] = (group, line)
    return rows


def write_page(entries: dict, case_ids: list, groups: dict, whats: dict, kept: dict) -> str:
    parts = [HEAD]
    for group in GROUPS:
        ids = [i for i in case_ids if groups[i] == group]
        if not ids:
            continue
        parts.append(f"\n### {group}\n\n| input | command | message (stderr) | exit | test |\n|---|---|---|---|---|\n")
        for i in ids:
            if i in entries:
                e = entries[i]
                parts.append(f"| {cell(e['what'])} | {code(e['command'])} | {code(e['line'])} | {e['exit']} | `{i}` |\n")
            elif i in kept:
                parts.append(kept[i][1] + "\n")
            else:
                parts.append(f"| {cell(whats[i])} | — | not yet as the contract says: the case fails | — | `{i}` |\n")
    parts.append(TAIL)
    return "".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="leave the slow fault tests out; keep their rows")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "tests"))
    from test_fuzz import CASES
    from test_fuzz_faults import FAULT_GROUPS

    page = PAGE.read_text()
    with tempfile.TemporaryDirectory() as tmp:
        record = Path(tmp) / "fuzz.jsonl"
        status = run_suite(record, args.fast)
        entries = read_records(record)
    case_ids = [c.id for c in CASES] + list(FAULT_GROUPS)
    groups = {**{c.id: c.group for c in CASES}, **{i: g for i, (g, _) in FAULT_GROUPS.items()}}
    whats = {**{c.id: c.what for c in CASES}, **{i: w for i, (_, w) in FAULT_GROUPS.items()}}
    kept = kept_rows(page, set(FAULT_GROUPS)) if args.fast else {}
    PAGE.write_text(write_page(entries, case_ids, groups, whats, kept))
    failing = [i for i in case_ids if i not in entries and i not in kept]
    print(f"wrote {PAGE.relative_to(REPO)}: {len(case_ids) - len(failing)} cases recorded, "
          f"{len(failing)} not passing yet{': ' + ', '.join(failing) if failing else ''}")
    return 0 if status in (0, 1) else status


if __name__ == "__main__":
    sys.exit(main())
