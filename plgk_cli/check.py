"""Validation of a run directory before any work: every problem, not only the first.

`plgk check DIR` prints them all; `plgk replay` runs the same checks and refuses to start on the
first one. Checks: manifest (present, known version, its checksum, every field's type and range,
each on a line of its own), steps contiguous from 0 at the manifest's
stride and complete, every checkpoint readable, its tensors matching their checksums, and of this
run, parameter names/shapes/dtypes as the manifest says, optimizer state shaped like its
parameter, batch indices inside the training split, no NaN/Inf in any recorded tensor, the data's
fingerprint, the model's parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from plgk_cli.errors import DataError, NonFiniteError, PlgkError, TrajectoryError
from plgk_cli.manifest import ManifestError
from plgk_cli.run import Run, load_run
from plgk_cli.trajectory import (MANIFEST, RECORDED_BY_TRAIN, checkpoint_path, checkpoint_run_id,
                                 list_steps, missing_block_file, read_checkpoint, recorded_by)


# A complete run's steps missing after the last checkpoint present are one problem, not one per
# step, when there are more than a block's or this many of them (a total_steps far past the files).
MAX_TAIL_LISTED = 64


@dataclass(frozen=True)
class Problem:
    message: str
    error: type = TrajectoryError  # the PlgkError subclass replay raises for it

    def raise_(self, more: int = 0):
        hint = f" (and {more} more problem{'s' if more > 1 else ''}: run `plgk check`)" if more else ""
        raise self.error(self.message + hint)


def _all_finite(tensors: list) -> bool:
    """One pass over all float tensors of a checkpoint (per-tensor checks only to name a failure)."""
    floats = [t.reshape(-1) for t in tensors if t.is_floating_point()]
    if not floats:
        return True
    if len({t.dtype for t in floats}) > 1:
        floats = [t.double() for t in floats]
    return bool(torch.isfinite(torch.cat(floats)).all())


def _non_finite(t: torch.Tensor) -> str | None:
    """'2 NaN of 24 values' (or Inf, or both) for a float tensor that is not all finite; else None."""
    if not t.is_floating_point() or bool(torch.isfinite(t).all()):
        return None
    counts = ((int(torch.isnan(t).sum()), "NaN"), (int(torch.isinf(t).sum()), "Inf"))
    return " and ".join(f"{n} {what}" for n, what in counts if n) + f" of {t.numel()} values"


def _foreign_manifest(run_dir: Path, run_id: str, steps: list) -> str | None:
    """The run id that every checkpoint names when it is not the manifest's (a manifest copied
    from another run), else None. Needs two readable checkpoints to tell it from one stray file."""
    ids = [i for i in (checkpoint_run_id(run_dir, s) for s in steps) if i is not None]
    if len(ids) >= 2 and len(set(ids)) == 1 and ids[0] != run_id:
        return ids[0]
    return None


def how_to_finish(run_dir: Path, manifest: dict) -> str:
    """What finishes an interrupted run, by what recorded it: `plgk train --resume` continues only
    its own runs; a loop of the user's own resumes through the Recorder, if at all."""
    if recorded_by(manifest) == RECORDED_BY_TRAIN:
        return f"finish it with `plgk train --config ... --out {run_dir} --resume`"
    return ("it was recorded by your own training loop (the Recorder), not `plgk train`: run the loop "
            "again, into a new directory or with Recorder(..., overwrite=True) into this one, or continue "
            "it with Recorder(..., resume=True) in a loop that skips the recorder.step_count updates "
            "already recorded (docs/recorder.md#resuming-an-interrupted-loop)")


def validate_run(run_dir: str | Path, *, check_data: bool = True, run: Run | None = None) -> list[Problem]:
    """Every problem of the run in ``run_dir``; ``run``: the run already loaded from there (replay's,
    whose data set is then read once, not twice: 1.7 s of a LeNet-5 replay on 51,200 images)."""
    run_dir = Path(run_dir)
    try:
        run = run if run is not None else load_run(run_dir)
    except ManifestError as exc:  # each field that is wrong, one line each
        return [Problem(line) for line in exc.lines]
    except PlgkError as exc:
        return [Problem(str(exc), type(exc))]
    manifest = run.manifest
    problems: list[Problem] = []
    every = int(manifest.get("checkpoint_every", 1))
    steps = list_steps(run_dir, every)
    run_id = run.run_id
    other = _foreign_manifest(run_dir, run_id, steps)
    if other is not None:
        problems.append(Problem(f"{run_dir / MANIFEST}: names run {run_id!r} but all its checkpoints "
                                f"belong to run {other!r}; the manifest was copied from another run: "
                                "restore this run's manifest.json or re-run `plgk train`"))
        run_id = other  # check the checkpoints among themselves
    if not manifest.get("complete"):
        problems.append(Problem(f"{run_dir}: training did not finish (manifest complete = false; "
                                f"last checkpoint step {steps[-1] if steps else None} of "
                                f"{manifest.get('total_steps')}); replay needs a finished run: "
                                + how_to_finish(run_dir, manifest)))
    if manifest.get("nonfinite"):
        problems.append(Problem(f"{run_dir}: update {manifest['nonfinite']['first_step']} made the loss, a "
                                "gradient or a parameter NaN or Inf (recorded with --allow-nonfinite); an audit "
                                "of it would be NaN: train again with a lower learning rate, or check the data",
                                NonFiniteError))
    total = manifest["total_steps"]
    last_present = steps[-1] if steps else 0
    last = total if manifest.get("complete") else last_present
    if last - last_present > min(every, MAX_TAIL_LISTED):  # not one missing file per step
        problems.append(Problem(f"{run_dir}: the manifest says {total} steps but the last checkpoint is "
                                f"step {last_present}; checkpoints are missing at the end: restore them "
                                "or re-run `plgk train`"))
        last = last_present
    expected = list(range(0, last + 1))  # a sparse run records every step; θ every `every`
    full_at = set(range(0, last + 1, every)) | {last}
    present = sorted(set(steps))
    files = set(list_steps(run_dir))
    covered = set()  # steps whose block file is reported missing below
    for block_end in sorted(full_at - files) if every > 1 else ():
        problems.append(Problem(missing_block_file(run_dir, block_end, every)))
        covered |= set(range(block_end - (block_end - 1) % every if block_end else 0, block_end + 1))
    for missing in sorted(set(expected) - set(steps) - covered):
        below = max((s for s in present if s < missing), default=None)
        above = min((s for s in present if s > missing), default=None)
        where = f"between steps {below} and {above}" if below is not None and above is not None \
            else f"at step {missing}"
        problems.append(Problem(f"{checkpoint_path(run_dir, missing)}: missing; the run has a gap "
                                f"{where}: restore the file or re-run `plgk train`"))
    for extra in sorted(set(steps) - set(expected)):
        problems.append(Problem(f"{checkpoint_path(run_dir, extra)}: step {extra} is past the run's "
                                f"last step {last}; remove it"))

    shapes = {p["name"]: (p["shape"], p["dtype"]) for p in manifest["parameters"]}
    num_train = manifest["dataset"]["num_train"]
    for step in sorted(set(steps) & set(expected)):
        path = checkpoint_path(run_dir, step)
        try:
            ck = read_checkpoint(run_dir, step, run_id, every)
        except PlgkError as exc:
            if str(exc) not in {p.message for p in problems}:  # a sparse block file read twice
                problems.append(Problem(str(exc), type(exc)))
            continue
        if not ck.full and step in full_at:
            problems.append(Problem(f"{path}: holds no parameters, but a run with checkpoints every "
                                    f"{every} steps stores θ at step {step}: restore it or re-run "
                                    "`plgk train`"))
        finite = _all_finite([*ck.params.values(), *(t for st in ck.optim_state.values() for t in st.values())])
        for name, (shape, dtype) in shapes.items() if ck.full else ():
            t = ck.params.get(name)
            if t is None:
                problems.append(Problem(f"{path}: param/{name} missing"))
            elif list(t.shape) != shape or str(t.dtype).removeprefix("torch.") != dtype:
                problems.append(Problem(f"{path}: param/{name} is {str(t.dtype)[6:]} {list(t.shape)}, "
                                        f"the manifest says {dtype} {shape}"))
            elif not finite and (bad := _non_finite(t)):
                problems.append(Problem(f"{path}: param/{name} holds {bad}; training diverged "
                                        "before this step (or the file was damaged): audit a "
                                        "shorter run, lower the lr or re-run `plgk train`"))
        for name, state in ck.optim_state.items():
            for key, t in state.items():
                if name not in shapes or list(t.shape) != shapes[name][0]:
                    problems.append(Problem(f"{path}: optim/{name}/{key} does not match a recorded "
                                            "parameter's shape"))
                elif not finite and (bad := _non_finite(t)):
                    problems.append(Problem(f"{path}: optim/{name}/{key} holds {bad}; the "
                                            "optimizer state diverged (or the file was damaged): "
                                            "re-run `plgk train`"))
        if ck.batch is not None:
            outside = ck.batch[(ck.batch < 0) | (ck.batch >= num_train)]
            if ck.batch.numel() == 0:
                problems.append(Problem(f"{path}: batch is empty; the file is damaged: re-run "
                                        "`plgk train`"))
            elif len(outside):
                problems.append(Problem(f"{path}: batch holds index {int(outside[0])} "
                                        f"({len(outside)} of {ck.batch.numel()} indices) outside "
                                        f"the training split 0..{num_train - 1}; the file is "
                                        "damaged or of other data: re-run `plgk train`"))
            for key, value in (("lr", ck.lr), ("clip_coef", ck.clip_coef), ("loss", ck.loss)):
                if not math.isfinite(value):  # a float64 record: torch.tensor(value) would be float32
                    problems.append(Problem(f"{path}: {key} is {value}"))
    try:
        if 0 in files:  # a missing step 0 is reported above
            run.changing_buffers  # noqa: B018 (each named buffer has its step-0 value)
    except PlgkError as exc:
        if str(exc) not in {p.message for p in problems}:  # step 0 unreadable: reported above
            problems.append(Problem(str(exc), type(exc)))
    if check_data:
        try:
            run.dataset  # noqa: B018 (loads and compares the fingerprint, the counts and shapes)
            shapes_agree = True
        except TrajectoryError as exc:  # the manifest misstates the data's shape: no model of it
            problems.append(Problem(str(exc), type(exc)))
            shapes_agree = False
        except PlgkError as exc:
            problems.append(Problem(str(exc), type(exc) if isinstance(exc, DataError) else DataError))
            shapes_agree = True
        if shapes_agree:
            try:
                run.build_model()
            except PlgkError as exc:
                problems.append(Problem(str(exc), type(exc)))
    return problems
