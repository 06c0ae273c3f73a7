"""Validation of a run directory before any work: every problem, not only the first.

`plgk check DIR` prints them all; `plgk replay` runs the same checks and refuses to start on the
first one. Checks: manifest (present, known version), steps contiguous from 0 at the manifest's
stride and complete, every checkpoint readable and of this run, parameter names/shapes/dtypes as
the manifest says, optimizer state shaped like its parameter, batch indices inside the training
split, no NaN/Inf in any recorded tensor, the data's fingerprint, the model's parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from plgk_cli.errors import DataError, PlgkError, TrajectoryError
from plgk_cli.run import load_run
from plgk_cli.trajectory import checkpoint_path, list_steps, read_checkpoint


@dataclass(frozen=True)
class Problem:
    message: str
    error: type = TrajectoryError  # the PlgkError subclass replay raises for it

    def raise_(self, more: int = 0):
        hint = f" (and {more} more problem{'s' if more > 1 else ''}: run `plgk check`)" if more else ""
        raise self.error(self.message + hint)


def _non_finite(name: str, t: torch.Tensor) -> bool:
    return t.is_floating_point() and not bool(torch.isfinite(t).all())


def validate_run(run_dir: str | Path, *, check_data: bool = True) -> list[Problem]:
    run_dir = Path(run_dir)
    try:
        run = load_run(run_dir)
    except PlgkError as exc:
        return [Problem(str(exc), type(exc))]
    manifest = run.manifest
    problems: list[Problem] = []
    if not manifest.get("complete"):
        problems.append(Problem(f"{run_dir}: training did not finish (manifest complete = false); "
                                "finish it with `plgk train --resume` or re-train"))
    steps = list_steps(run_dir)
    every = int(manifest.get("checkpoint_every", 1))
    total = int(manifest.get("total_steps", steps[-1] if steps else 0))
    last = total if manifest.get("complete") else (steps[-1] if steps else 0)
    expected = list(range(0, last + 1, every))
    if last % every:
        expected.append(last)
    present = sorted(set(steps))
    for missing in sorted(set(expected) - set(steps)):
        below = max((s for s in present if s < missing), default=None)
        above = min((s for s in present if s > missing), default=None)
        where = f"between steps {below} and {above}" if below is not None and above is not None \
            else f"at step {missing}"
        problems.append(Problem(f"{checkpoint_path(run_dir, missing)}: missing; the run has a gap "
                                f"{where}: restore the file or re-run `plgk train`"))
    for extra in sorted(set(steps) - set(expected)):
        problems.append(Problem(f"{checkpoint_path(run_dir, extra)}: step {extra} is not on the "
                                f"run's checkpoint grid (every {every}, last {last}); remove it"))

    shapes = {p["name"]: (p["shape"], p["dtype"]) for p in manifest["parameters"]}
    num_train = manifest["dataset"]["num_train"]
    for step in sorted(set(steps) & set(expected)):
        path = checkpoint_path(run_dir, step)
        try:
            ck = read_checkpoint(run_dir, step, run.run_id)
        except PlgkError as exc:
            problems.append(Problem(str(exc), type(exc)))
            continue
        for name, (shape, dtype) in shapes.items():
            t = ck.params.get(name)
            if t is None:
                problems.append(Problem(f"{path}: param/{name} missing"))
            elif list(t.shape) != shape or str(t.dtype).removeprefix("torch.") != dtype:
                problems.append(Problem(f"{path}: param/{name} is {str(t.dtype)[6:]} {list(t.shape)}, "
                                        f"the manifest says {dtype} {shape}"))
            elif _non_finite(name, t):
                problems.append(Problem(f"{path}: param/{name} holds NaN or Inf; training diverged "
                                        "before this step: audit a shorter run or lower the lr"))
        for name, state in ck.optim_state.items():
            for key, t in state.items():
                if name not in shapes or list(t.shape) != shapes[name][0]:
                    problems.append(Problem(f"{path}: optim/{name}/{key} does not match a recorded "
                                            "parameter's shape"))
                elif _non_finite(key, t):
                    problems.append(Problem(f"{path}: optim/{name}/{key} holds NaN or Inf"))
        if ck.batch is not None:
            if ck.batch.numel() == 0 or int(ck.batch.min()) < 0 or int(ck.batch.max()) >= num_train:
                problems.append(Problem(f"{path}: batch indices outside the training split "
                                        f"(0..{num_train - 1}) or empty"))
            for key, value in (("lr", ck.lr), ("clip_coef", ck.clip_coef), ("loss", ck.loss)):
                if not torch.isfinite(torch.tensor(value)):
                    problems.append(Problem(f"{path}: {key} is {value}"))
    if check_data:
        try:
            run.dataset  # noqa: B018 (loads and compares the fingerprint)
        except PlgkError as exc:
            problems.append(Problem(str(exc), type(exc) if isinstance(exc, DataError) else DataError))
        try:
            run.build_model()
        except PlgkError as exc:
            problems.append(Problem(str(exc), type(exc)))
    return problems
