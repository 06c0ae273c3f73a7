"""influences.h5 (schema v4): the only module that knows its names. Writer and reader.

Layout (train x audit, as TRAK and dattri):
  /                         attrs: plgk_version, schema_version, created, rule, targets (JSON),
                            replay_arguments (JSON), manifest (JSON), optimizer, complete_audit, group_by,
                            task, audited_mode (the audited quantities' model mode: "eval"),
                            accepted_update_error (where --accept-update-error gave the gate)
  /train/index (R)          training-split indices of the influence rows (R = M, or the subset)
  /train/label (R[, ...])   their labels (int64 classes, or float regression targets)
  /train/group (G)          with --group-by label: the class of each influence row (G rows)
  /audit/index (N)          indices into the split named by attr `split` (absent for npz audit sets)
  /audit/source             attr: the audit-set spec or npz path
  /audit/label (N)
  /audit/<target>/influence (R|G, N[, C])   float32 (accumulated in float64); attrs `sign` (what its
      sign means for this target, in words), `helpful_direction` (the task's: down, up, none or
      true-class-up; files before it have only a `sign` that speaks of the loss for every target)
  /audit/<target>/residual, initial, final (N[, C])
  /audit/<target>/buffer_residual (N[, C])  (runs whose training changed buffers, e.g. BatchNorm)
      Σ_s q(θ_{s+1}, b_{s+1}) − q(θ_{s+1}, b_s): the part of the true change the buffers made
  /audit/<target>/trace/step (K), trace/true_change, trace/reconstructed (K, N[, C])
  /audit/<target>/quadrature/segment_error (K-1, N[, C])  Δθ·h − Δq of each segment (measured:
      both ends of q are known); quadrature/sub_intervals (K-1, N[, C]) the pieces its rule used;
      with --rule adaptive also quadrature/gradient_error (K-1, N[, C]) ‖h − h_coarser‖ and
  /audit/<target>/error_bound (R|G, N[, C])  a bound on each influence entry's quadrature error
  /audit/<target>/by_layer_epoch/signed, abs (E, L, N[, C]); attr `layers`
  /audit/<target>/by_epoch/net, gross (E, N[, C])  S_n(e), G_n(e): Σ_m P̃_mn(e) and Σ_m |P̃_mn(e)|
      with P̃(e) the influence of the gradients taken up to the end of epoch e (paper 6.3)
      attrs on /audit/<target>: mre, lc, rmre, max_update_error, attribution_gap, complete
  /replay/update_error (T)  per-step relative error of the modelled update against the record
  /replay/drift_step, drift  (sparse runs) per stored checkpoint reached by re-simulation:
      ‖θ_resimulated − θ_stored‖ / ‖θ_stored − θ_block start‖; attr max_drift
  /kernel (with --kernel or --modes; geometry.py)  attrs: stride, precondition, weights,
      temporal_participation_ratio, temporal_kernel, regime_sample
    step (K_k) kernel checkpoints; audit_gram (N, N) PLGK; audit_norm_sq (N); audit_ips (N, N);
    audit_train_gram (N, M); train_norm_sq (M); audit_train_ips (N, M); train_label (M); [train_gram, train_ips (M, M)];
    audit_logits (N, C) at θ_T; temporal/gram (K_k, K_k), temporal/eigenvalues,
    temporal/prefix_participation_ratio; regime/feature_overlap, subspace_overlap,
    activation_overlap (K_k) against the final checkpoint (paper 6.3 (i)-(iii))
  /modes/step_XXXXXXXX (with --modes, svd)  attrs: method, step, total_energy, k_at_90/95/99 (−1: not
      reached by the K modes), k (the K kept), energy_target (--modes auto's share; 0: a fixed K),
      converged, estimated_error (largest estimated relative error of s), passes (over the rows);
      s, a, drive, energy_curve (K); coefficients (N, K);
      cancellation (K_k, N, K) CR of the first k modes held fixed, at every kernel checkpoint; [v (P, K)]
  /modes/oja (with --modes-method oja)  captured_energy (K_k); cancellation (K_k, N, K); [v]
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from plgk_cli import __version__
from plgk_cli.errors import OutputError, StoreError
from plgk_cli.outputs import os_error, remedy, write_failure
from plgk_cli.manifest import problems as manifest_problems
from plgk_cli.tasks import known_direction, quantity_name, sign_sentence, task_for

SCHEMA_VERSION = 6  # 2: /kernel, /modes, /audit/<target>/by_epoch; 3: task, buffer_residual;
# 4: quadrature/*, error_bound, accepted_update_error, checksums; 5: helpful_direction, a `sign` per target;
# 6: /modes/step_* attrs k, energy_target, converged, estimated_error, passes
READABLE_SCHEMAS = (2, 3, 4, 5, 6)  # a version 2 file is a classification audit without buffers
KERNEL, MODES = "kernel", "modes"
COMPRESSION = dict(compression="gzip", compression_opts=4, shuffle=True)
CHECKSUM = dict(fletcher32=True)  # HDF5 checksums every chunk and verifies it on every read


def sign_attribute(target: str, direction: str, ndim: int, grouped: bool) -> str:
    """The `sign` attribute of a target's influence dataset: what an entry is and what its sign means."""
    rows = "training group m (--group-by)" if grouped else "training example m"
    column = ("t" if target == "token-losses" else "c") if ndim == 3 else None
    what = quantity_name(target, column)
    index = "m, n" if column is None else f"m, n, {column}"
    meaning = sign_sentence(direction, what, own_class="the class that is audit point n's label")
    return f"influence[{index}]: how much {rows} moved the {what} of audit point n over training. {meaning}"


def _helpful_directions(task_name: str, targets: list) -> dict:
    """Each target's helpful direction as the run's task states it."""
    try:
        task = task_for(task_name)
    except Exception:  # a py: task that fails to build a second time must not cost the finished replay
        return {t: known_direction(task_name, t) for t in targets}
    return {t: task.helpful_direction(t) for t in targets}


def _checksum(array: np.ndarray) -> dict:
    """CHECKSUM for an array that can take it: not a scalar, not variable-length strings."""
    return {} if np.ndim(array) == 0 or np.asarray(array).dtype.kind == "O" else CHECKSUM


@dataclass(frozen=True)
class TargetResult:
    """One audited target's arrays (numpy, float64) and metrics, ready to store."""

    name: str
    influence: np.ndarray  # (R, N[, C])
    residual: np.ndarray  # (N[, C])
    initial: np.ndarray
    final: np.ndarray
    trace_step: np.ndarray  # (K,)
    trace_true_change: np.ndarray  # (K, N[, C])
    trace_reconstructed: np.ndarray
    layer_epoch_signed: np.ndarray  # (E, L, N[, C])
    layer_epoch_abs: np.ndarray
    net: np.ndarray  # (E, N[, C]) S_n(e) = Σ_m influence of gradients up to the end of epoch e
    gross: np.ndarray  # (E, N[, C]) G_n(e) = Σ_m |same|
    mre: float
    lc: float
    rmre: float
    attribution_gap: float
    buffer_residual: np.ndarray | None = None  # (N[, C]) runs whose training changed buffers
    segment_error: np.ndarray | None = None  # (K-1, N[, C]) Δθ·h − Δq of each segment
    sub_intervals: np.ndarray | None = None  # (K-1, N[, C]) pieces the segment's rule used
    gradient_error: np.ndarray | None = None  # (K-1, N[, C]) ‖h − h_coarser‖ (adaptive)
    error_bound: np.ndarray | None = None  # (R, N[, C]) bound on each entry's quadrature error (adaptive)


def check_writable(path: Path, overwrite: bool) -> None:
    """Refuse early, before any work, to clobber an existing output or write into nowhere."""
    if path.is_dir():
        raise OutputError(f"{path}: is a directory; give --out a file path such as "
                          f"{path / 'influences.h5'}")
    if path.exists() and not overwrite:
        raise OutputError(f"{path}: exists; pass --overwrite to replace it or choose another --out")
    if not path.parent.is_dir():
        raise OutputError(f"{path.parent}: directory not found; create it or choose another --out")
    if not os.access(path.parent, os.W_OK):
        raise OutputError(f"{path.parent}: not writable; choose another --out")


def check_free_space(path: Path, needed: int) -> None:
    """Refuse before any work when the output's file system cannot hold the planned output.
    PLGK_FREE_BYTES overrides the measured free space (fault injection for tests)."""
    given = os.environ.get("PLGK_FREE_BYTES")
    if given is not None and not given.isdigit():
        raise OutputError(f"PLGK_FREE_BYTES: {given!r} is not a whole number of bytes (a test hook: unset it)")
    free = int(given) if given is not None else shutil.disk_usage(path.parent).free
    if free < needed:
        raise OutputError(f"{path.parent}: {_size(free)} free but the replay needs about "
                          f"{_size(needed)} (output and progress commits); free space or "
                          "choose another --out")


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _chunks(shape: tuple) -> tuple | None:
    if not shape or 0 in shape:
        return None
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * 4 if len(shape) > 1 else 4
    rows = max(1, min(shape[0], (1 << 20) // max(row_bytes, 1)))
    return (rows, *shape[1:])


def write_influences(path: Path, *, arguments: dict, manifest: dict, rule: str, targets: list,
                     train_index: np.ndarray, train_label: np.ndarray, group: np.ndarray | None,
                     audit_index: np.ndarray | None, audit_split: str | None, audit_source: str,
                     audit_label: np.ndarray, results: list, update_error: np.ndarray,
                     layers: list, complete_audit: bool, overwrite: bool, geometry=None,
                     drift: dict | None = None) -> Path:
    """Write to PATH.partial.<pid> and rename: a crash or a bad run never leaves a half file at
    PATH, and two writers never share the temporary file. A full disk (or another write failure)
    is one OutputError, with PATH as it was."""
    path = Path(path)
    check_writable(path, overwrite)
    tmp = partial_path(path)
    try:
        _write(tmp, arguments=arguments, manifest=manifest, rule=rule, targets=targets,
               train_index=train_index, train_label=train_label, group=group,
               audit_index=audit_index, audit_split=audit_split, audit_source=audit_source,
               audit_label=audit_label, results=results, update_error=update_error, layers=layers,
               complete_audit=complete_audit, geometry=geometry, drift=drift or {})
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # h5py reports a failed write as either
        error = os_error(exc)
        if error is None:
            raise
        raise write_failure(path, error, f"{remedy(error)} and run `plgk replay` again; {path} is as it "
                                         "was") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def partial_path(path: Path) -> Path:
    """The temporary file write_influences writes PATH into (this process's own)."""
    return Path(path).with_name(f"{Path(path).name}.partial.{os.getpid()}")


def _write(tmp: Path, *, arguments, manifest, rule, targets, train_index, train_label, group,
           audit_index, audit_split, audit_source, audit_label, results, update_error, layers,
           complete_audit, geometry, drift) -> None:
    with h5py.File(tmp, "w") as f:
        f.attrs.update({
            "plgk_version": __version__, "schema_version": SCHEMA_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "rule": rule, "targets": json.dumps(targets), "optimizer": manifest["optimizer"]["name"],
            "replay_arguments": json.dumps(arguments), "manifest": json.dumps(manifest),
            "complete_audit": complete_audit, "group_by": arguments.get("group_by") or "",
            "task": manifest.get("task", {}).get("name", "classification"), "audited_mode": "eval",
        })
        if arguments.get("max_update_error") is not None:  # --accept-update-error: the user's gate
            f.attrs["accepted_update_error"] = float(arguments["max_update_error"])
        f.create_dataset("train/index", data=train_index.astype(np.int64), **CHECKSUM)
        f.create_dataset("train/label", data=_labels(train_label), **CHECKSUM)
        if group is not None:
            f.create_dataset("train/group", data=group.astype(np.int64), **CHECKSUM)
        audit = f.create_group("audit")
        audit.attrs["source"] = audit_source
        if audit_index is not None:
            audit.create_dataset("index", data=audit_index.astype(np.int64), **CHECKSUM)
            audit.attrs["split"] = audit_split
        f.create_dataset("audit/label", data=_labels(audit_label), **CHECKSUM)
        f.create_dataset("replay/update_error", data=update_error, **CHECKSUM)
        if drift:  # sparse checkpoints: re-simulated θ against each stored checkpoint
            f.create_dataset("replay/drift_step", data=np.array(sorted(drift), dtype=np.int64), **CHECKSUM)
            f.create_dataset("replay/drift", data=np.array([drift[k] for k in sorted(drift)]), **CHECKSUM)
            f["replay"].attrs["max_drift"] = max(drift.values())
        directions = _helpful_directions(str(f.attrs["task"]), [r.name for r in results])
        for r in results:
            g = f.create_group(f"audit/{r.name}")
            g.attrs.update(mre=r.mre, lc=r.lc, rmre=r.rmre, attribution_gap=r.attribution_gap,
                           max_update_error=float(update_error.max(initial=0.0)),
                           complete=complete_audit)
            infl = g.create_dataset("influence", data=r.influence.astype(np.float32),
                                    chunks=_chunks(r.influence.shape), **COMPRESSION, **CHECKSUM)
            infl.attrs["helpful_direction"] = directions[r.name]
            infl.attrs["sign"] = sign_attribute(r.name, directions[r.name], r.influence.ndim, group is not None)
            infl.attrs["layout"] = "train x audit" + (" x class" if r.influence.ndim == 3 else "")
            for name in ("residual", "initial", "final"):
                g.create_dataset(name, data=getattr(r, name), **CHECKSUM)
            if r.buffer_residual is not None:
                g.create_dataset("buffer_residual", data=r.buffer_residual, **CHECKSUM)
            for name in ("segment_error", "sub_intervals", "gradient_error"):
                if getattr(r, name) is not None:
                    g.create_dataset(f"quadrature/{name}", data=getattr(r, name), **CHECKSUM)
            if r.error_bound is not None:
                g.create_dataset("error_bound", data=r.error_bound.astype(np.float32),
                                 chunks=_chunks(r.error_bound.shape), **COMPRESSION, **CHECKSUM)
            g.create_dataset("trace/step", data=r.trace_step.astype(np.int64), **CHECKSUM)
            g.create_dataset("trace/true_change", data=r.trace_true_change, **CHECKSUM)
            g.create_dataset("trace/reconstructed", data=r.trace_reconstructed, **CHECKSUM)
            g.create_dataset("by_layer_epoch/signed", data=r.layer_epoch_signed, **CHECKSUM)
            g.create_dataset("by_layer_epoch/abs", data=r.layer_epoch_abs, **CHECKSUM)
            g.create_dataset("by_epoch/net", data=r.net, **CHECKSUM)
            g.create_dataset("by_epoch/gross", data=r.gross, **CHECKSUM)
            g["by_layer_epoch"].attrs["layers"] = json.dumps(layers)
        if geometry is not None:
            kernel = f.create_group(KERNEL)
            kernel.attrs.update(geometry.kernel_attrs)
            for name, array in geometry.kernel.items():
                big = array.ndim == 2 and array.size > 4096
                kernel.create_dataset(name, data=array, **(dict(chunks=_chunks(array.shape), **COMPRESSION)
                                                           if big else {}), **_checksum(array))
            for name, arrays in geometry.modes.items():
                group = f.create_group(f"{MODES}/{name}")
                group.attrs.update({k: v for k, v in arrays["attrs"].items()})
                for key, array in arrays.items():
                    if key != "attrs":
                        group.create_dataset(key, data=array, **_checksum(array))


def _labels(labels: np.ndarray) -> np.ndarray:
    """Class labels as int64, regression targets as float64."""
    return labels.astype(np.int64 if np.issubdtype(labels.dtype, np.integer) else np.float64)


# What HDF5 raises where a file's bytes are damaged: a failed chunk checksum (fletcher32) or a
# failed inflate (OSError), an object header or heap that no longer parses (KeyError, OSError,
# RuntimeError), a datatype that makes no sense (ValueError, TypeError).
DAMAGE = (OSError, KeyError, RuntimeError, ValueError, TypeError)
RERUN = "restore the file or re-run `plgk replay`"


def _damaged(path: Path, what: str, exc: BaseException, why: str = "") -> StoreError:
    detail = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    return StoreError(f"{path}: {what} is damaged (HDF5: {detail}{why}): {RERUN}")


class _Verified:
    """An h5py file, group or dataset whose reads turn HDF5's errors over damaged bytes (DAMAGE: a
    chunk that fails its checksum or does not inflate, an object that does not parse) into one
    StoreError naming the file and the dataset or group."""

    def __init__(self, node, path: Path):
        self._node, self._path = node, path

    def __getitem__(self, key):
        if not isinstance(self._node, h5py.Dataset):
            try:
                return _Verified(self._node[key], self._path)
            except DAMAGE as exc:
                name = f"{self._node.name.rstrip('/')}/{key}"
                raise _damaged(self._path, f"object {name}", exc) from None
        try:
            return self._node[key]
        except DAMAGE as exc:
            # every dataset carries fletcher32 checksums: a damaged chunk fails its check first
            why = "; a chunk failed its checksum" if isinstance(exc, OSError) else ""
            raise _damaged(self._path, f"dataset {self._node.name}", exc, why) from None

    def __contains__(self, key) -> bool:
        return key in self._node

    def __iter__(self):
        return iter(self._node)

    def __len__(self) -> int:
        return len(self._node)

    @property
    def attrs(self) -> dict:
        """The node's attributes, read in full (a damaged attribute fails here, as a StoreError)."""
        try:
            return dict(self._node.attrs)
        except DAMAGE as exc:
            raise _damaged(self._path, f"the attributes of {self._node.name}", exc) from None

    def __getattr__(self, name):  # close, shape, dtype, ...
        return getattr(self._node, name)


# What the readers need of every file, checked when it is opened (InfluenceFile._validate): the
# root attributes (JSON: parsed), the datasets, and for each target its datasets and attributes.
ROOT_ATTRS = {"schema_version": "integer", "targets": "JSON", "manifest": "JSON",
              "replay_arguments": "JSON", "rule": "text", "optimizer": "text", "complete_audit": "flag",
              "group_by": "text"}
ROOT_DATASETS = ("train/index", "train/label", "audit/label", "replay/update_error")
TARGET_DATASETS = ("influence", "residual", "initial", "final", "trace/step", "trace/true_change",
                   "trace/reconstructed", "by_layer_epoch/signed", "by_layer_epoch/abs", "by_epoch/net",
                   "by_epoch/gross")
TARGET_ATTRS = ("mre", "lc", "rmre", "max_update_error", "attribution_gap")


def _kind_problem(value, kind: str) -> str | None:
    """Why an attribute's value is not of ``kind`` (None: it is)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if kind == "integer":
        ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    elif kind == "number":
        ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    elif kind == "flag":
        ok = isinstance(value, (bool, np.bool_, int, np.integer))
    elif kind == "JSON":
        try:
            json.loads(value)
            ok = isinstance(value, str)
        except (TypeError, ValueError):
            ok = False
    else:
        ok = isinstance(value, str)
    return None if ok else f"{value!r:.60} is not {'a' if kind != 'integer' else 'an'} {kind} value"


class InfluenceFile:
    """Read-only view of an influences.h5. Arrays come back as numpy."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            progress = self.path.with_name(self.path.name + ".progress")
            if progress.is_file():
                raise StoreError(f"{self.path}: not written yet; a replay is running or was "
                                 f"interrupted (its progress is in {progress.name}): continue it "
                                 "with `plgk replay ... --resume`")
            raise StoreError(f"{self.path}: file not found")
        try:
            self._f = _Verified(h5py.File(self.path, "r"), self.path)
        except OSError as exc:
            # HDF5's own words for a lock held by a writer; a bare "lock" also matches the
            # "sblock" (superblock) of a truncated file's error.
            if re.search(r"unable to lock file|file locking", str(exc), re.I):
                raise StoreError(f"{self.path}: another process has it open for writing; wait for "
                                 "it to finish (or close it) and try again") from None
            raise StoreError(f"{self.path}: not a readable HDF5 file ({exc}); it may be truncated "
                             "or still being written") from None
        if self._f.attrs.get("schema_version") is None or "audit" not in self._f:
            self._f.close()
            raise StoreError(f"{self.path}: not a plgk influences file (no schema_version or /audit)")
        problem = _kind_problem(self._f.attrs["schema_version"], "integer")
        if problem is not None:
            self._f.close()
            raise StoreError(f"{self.path}: attribute schema_version: {problem}; {RERUN}")
        if int(self._f.attrs["schema_version"]) not in READABLE_SCHEMAS:
            version = int(self._f.attrs["schema_version"])
            self._f.close()
            raise StoreError(f"{self.path}: schema version {version}; this plgk reads versions "
                             f"{', '.join(map(str, READABLE_SCHEMAS))}")
        try:
            self._validate()
        except DAMAGE as exc:  # an object that does not parse while looking for it
            self._f.close()
            raise _damaged(self.path, "its structure", exc) from None
        except StoreError:
            self._f.close()
            raise

    def _validate(self) -> None:
        """Refuse (StoreError) a file that lacks something a reader needs (ROOT_ATTRS, ROOT_DATASETS,
        TARGET_DATASETS, TARGET_ATTRS), or holds it of the wrong kind: a damaged file, or one not
        written by plgk, fails here, when it is opened, not halfway through a report."""
        attrs = self._f.attrs
        for name, kind in ROOT_ATTRS.items():
            self._check_attribute(attrs, "/", name, kind)
        targets = json.loads(attrs["targets"])
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
            raise StoreError(f"{self.path}: attribute targets is {attrs['targets']!r:.60}, not a list of "
                             f"target names; {RERUN}")
        for name in ("manifest", "replay_arguments"):
            if not isinstance(json.loads(attrs[name]), dict):
                raise StoreError(f"{self.path}: attribute {name} is not a JSON object; {RERUN}")
        for name in ROOT_DATASETS:
            self._dataset(name)
        self._check_attribute(self._f["audit"].attrs, "/audit", "source", "text")
        points = self._dataset("audit/label").shape[:1]
        for target in targets:
            if f"audit/{target}" not in self._f:
                raise StoreError(f"{self.path}: group /audit/{target} of target {target!r} is missing; {RERUN}")
            for name in TARGET_DATASETS:
                self._dataset(f"audit/{target}/{name}")
            for name in TARGET_ATTRS:
                self._check_attribute(self._f[f"audit/{target}"].attrs, f"/audit/{target}", name, "number")
            self._check_attribute(self._f[f"audit/{target}/by_layer_epoch"].attrs,
                                  f"/audit/{target}/by_layer_epoch", "layers", "JSON")
            influence = self._dataset(f"audit/{target}/influence")
            if influence.ndim not in (2, 3) or influence.shape[1:2] != points:
                raise StoreError(f"{self.path}: dataset /audit/{target}/influence has shape {influence.shape}, "
                                 f"not (rows, {points[0] if points else '?'} audit points[, classes]); {RERUN}")
            rows = len(self._dataset("train/group")) if "train/group" in self._f else len(self._dataset("train/index"))
            row_names = ("train/group",) if "train/group" in self._f else ("train/index", "train/label")
            for name in row_names:  # one per influence row: what inspect lists them by
                if len(self._dataset(name)) != influence.shape[0] or rows != influence.shape[0]:
                    raise StoreError(f"{self.path}: dataset /{name} has {len(self._dataset(name))} entries for "
                                     f"{influence.shape[0]} influence rows; {RERUN}")
        if "audit/index" in self._f and self._dataset("audit/index").shape[:1] != points:
            raise StoreError(f"{self.path}: dataset /audit/index has {len(self._dataset('audit/index'))} entries "
                             f"for {points[0]} audit points; {RERUN}")
        found = manifest_problems(json.loads(attrs["manifest"])) if isinstance(
            json.loads(attrs["manifest"]).get("format_version"), int) else ["format_version is missing"]
        if found:
            raise StoreError(f"{self.path}: attribute manifest (the run's): {found[0]}; {RERUN}")

    def _check_attribute(self, attrs: dict, where: str, name: str, kind: str) -> None:
        place = f"attribute {name}" if where == "/" else f"attribute {name} of {where}"
        if name not in attrs:
            raise StoreError(f"{self.path}: {place} is missing; the file is damaged or was not written "
                             f"by plgk: {RERUN}")
        problem = _kind_problem(attrs[name], kind)
        if problem is not None:
            raise StoreError(f"{self.path}: {place}: {problem}; {RERUN}")

    def _dataset(self, name: str):
        """The dataset ``name``, which must exist and hold numbers."""
        if name not in self._f:
            raise StoreError(f"{self.path}: dataset /{name} is missing; the file is damaged or was not "
                             f"written by plgk: {RERUN}")
        node = self._f[name]
        if not isinstance(node._node, h5py.Dataset) or node.dtype.kind not in "biuf":
            what = "a group" if not isinstance(node._node, h5py.Dataset) else f"of type {node.dtype}"
            raise StoreError(f"{self.path}: /{name} is {what}, not a dataset of numbers; {RERUN}")
        return node

    def close(self):
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def attrs(self) -> dict:
        return dict(self._f.attrs)

    @property
    def targets(self) -> list:
        return json.loads(self._f.attrs["targets"])

    @property
    def task(self) -> str:
        """The run's task (files of schema 2 hold classification audits)."""
        return str(self._f.attrs.get("task", "classification"))

    def quadrature(self, target: str) -> dict:
        """{"segment_error", "sub_intervals"[, "gradient_error"]} of each segment (empty for files
        written before schema 4)."""
        group = self._target(target)
        return {name: group[f"quadrature/{name}"][()] for name in ("segment_error", "sub_intervals", "gradient_error")
                if f"quadrature/{name}" in group}

    def error_bound(self, target: str = "loss") -> np.ndarray | None:
        """The bound on each influence entry's quadrature error (--rule adaptive; else None)."""
        group = self._target(target)
        return group["error_bound"][()] if "error_bound" in group else None

    def buffer_residual(self, target: str) -> np.ndarray | None:
        """The buffers' part of the true change (None: training changed no buffer)."""
        group = self._target(target)
        return group["buffer_residual"][()] if "buffer_residual" in group else None

    @property
    def manifest(self) -> dict:
        return json.loads(self._f.attrs["manifest"])

    @property
    def arguments(self) -> dict:
        return json.loads(self._f.attrs["replay_arguments"])

    def _target(self, target: str):
        if target not in self.targets:
            raise StoreError(f"{self.path}: no target {target!r}; it holds {', '.join(self.targets)}")
        return self._f[f"audit/{target}"]

    def metrics(self, target: str) -> dict:
        return {k: (float(v) if not isinstance(v, (bool, np.bool_)) else bool(v))
                for k, v in self._target(target).attrs.items()}

    def array(self, target: str, name: str) -> np.ndarray:
        """influence, residual, initial, final, trace/step, trace/true_change,
        trace/reconstructed, by_layer_epoch/signed, by_layer_epoch/abs."""
        return self._target(target)[name][()]

    def influence(self, target: str = "loss") -> np.ndarray:
        influence = self.array(target, "influence")
        if not np.isfinite(influence).all():  # replay never writes one: a ranking of NaNs is no ranking
            raise StoreError(f"{self.path}: dataset /audit/{target}/influence holds NaN or Inf, which plgk "
                             f"replay never writes; the file was changed: {RERUN}")
        return influence

    def helpful_direction(self, target: str = "loss") -> str:
        """Which way of ``target`` helps the audit point: down, up, none or true-class-up (a task's
        direction, tasks.DIRECTIONS). Files written before it was stored: the built-in meaning."""
        stored = self._target(target)["influence"].attrs.get("helpful_direction")
        return str(stored) if stored is not None else known_direction(self.task, target)

    def layers(self, target: str = "loss") -> list:
        return json.loads(self._target(target)["by_layer_epoch"].attrs["layers"])

    @property
    def train_index(self) -> np.ndarray:
        return self._f["train/index"][()]

    @property
    def train_label(self) -> np.ndarray:
        return self._f["train/label"][()]

    @property
    def train_group(self) -> np.ndarray | None:
        return self._f["train/group"][()] if "train/group" in self._f else None

    @property
    def audit_index(self) -> np.ndarray | None:
        return self._f["audit/index"][()] if "audit/index" in self._f else None

    @property
    def audit_label(self) -> np.ndarray:
        return self._f["audit/label"][()]

    @property
    def audit_source(self) -> str:
        return str(self._f["audit"].attrs["source"])

    @property
    def audit_split(self) -> str | None:
        return self._f["audit"].attrs.get("split")

    @property
    def update_error(self) -> np.ndarray:
        return self._f["replay/update_error"][()]

    @property
    def max_drift(self) -> float | None:
        """Largest re-simulation drift of a sparse run; None when every step was stored."""
        value = self._f["replay"].attrs.get("max_drift")
        return None if value is None else float(value)

    # -- kernel geometry (schema 2; present with replay --kernel / --modes)

    @property
    def has_kernel(self) -> bool:
        return KERNEL in self._f

    def _kernel_group(self):
        if not self.has_kernel:
            raise StoreError(f"{self.path}: no kernel results; replay with --kernel (or --modes)")
        return self._f[KERNEL]

    @property
    def kernel_attrs(self) -> dict:
        return dict(self._kernel_group().attrs)

    def kernel(self, name: str) -> np.ndarray:
        """step, audit_gram, audit_norm_sq, audit_ips, audit_train_gram, train_norm_sq,
        audit_train_ips, [train_gram, train_ips], audit_logits, temporal/gram,
        temporal/eigenvalues, temporal/prefix_participation_ratio, regime/feature_overlap,
        regime/subspace_overlap, regime/activation_overlap."""
        group = self._kernel_group()
        if name not in group:
            raise StoreError(f"{self.path}: no /kernel/{name}")
        return group[name][()]

    def datamodel(self, ridge: float = 10.0) -> np.ndarray:
        """The PLGK datamodel: τ = (K_tt + λ I)⁻¹ K_tn (M x N; λ = ``ridge`` × the mean of K_tt's
        diagonal), a kernel regression on the path-integrated features, TRAK-style, from one run;
        τ[m, n] > 0 predicts that training on example m lowers audit point n's loss (raises its
        margin), and Σ_{m∈S} τ[m, n] what a model retrained on the subset S does to it, up to a
        constant (docs/experiments.md (e): its LDS against TRAK's). Needs a replay with
        --kernel --kernel-train (K_tt) and, for Adam's preconditioned kernel, --precondition."""
        group = self._kernel_group()
        if "train_gram" not in group:
            raise StoreError(f"{self.path}: no /kernel/train_gram; replay with --kernel --kernel-train")
        if not (isinstance(ridge, (int, float)) and np.isfinite(ridge) and ridge > 0):
            raise StoreError(f"datamodel: ridge must be a finite number > 0, got {ridge!r}")
        k_tt = group["train_gram"][()].astype(np.float64)
        k_tt = (k_tt + k_tt.T) / 2  # symmetric up to the rounding of its accumulation
        k_tn = group["audit_train_gram"][()].astype(np.float64).T
        lam = ridge * float(np.mean(np.diag(k_tt)))
        return np.linalg.solve(k_tt + lam * np.eye(len(k_tt)), k_tn)

    def distances(self, which: str = "audit_ips") -> tuple[np.ndarray, np.ndarray]:
        """(chord, angle) distances of an IPS matrix (paper Cor. 4.1.1): sqrt(2 − 2·IPS), arccos(IPS)."""
        import torch

        from plgk_cli.kernel import angle_distance, chord_distance

        ips = torch.from_numpy(self.kernel(which))
        return chord_distance(ips).numpy(), angle_distance(ips).numpy()

    @property
    def modes(self) -> list:
        return sorted(self._f[MODES]) if MODES in self._f else []

    def mode(self, name: str, key: str) -> np.ndarray:
        if name not in self.modes:
            raise StoreError(f"{self.path}: no modes {name!r}; it holds {', '.join(self.modes) or 'none'}")
        return self._f[f"{MODES}/{name}/{key}"][()]

    def mode_attrs(self, name: str) -> dict:
        self.mode(name, "cancellation")  # existence check with the same message
        return dict(self._f[f"{MODES}/{name}"].attrs)

    def difficulty_scores(self) -> dict:
        """Per audit point (paper 6.2, Table 1), oriented so that higher = more confident: the IPS
        ℓ2 norm to the training set, the class-conditioned IPS margin (predicted class), max-softmax
        and the logit margin at θ_T; with `misclassified` and the final `loss`."""
        import torch

        from plgk_cli.kernel import ips_class_margin, ips_l2_norm

        if not np.issubdtype(self.audit_label.dtype, np.integer) or self.audit_label.ndim != 1:
            raise StoreError(f"{self.path}: difficulty scores rank misclassified points; the run's task "
                             f"{self.task} has no class labels")
        logits = torch.from_numpy(self.kernel("audit_logits"))
        labels = torch.from_numpy(self.audit_label)
        ips = torch.from_numpy(self.kernel("audit_train_ips"))
        predicted = logits.argmax(1)
        top2 = logits.topk(min(2, logits.shape[1]), dim=1).values
        num_classes = logits.shape[1]
        return {
            "ips_l2_norm": ips_l2_norm(ips).numpy(),
            "ips_class_margin": ips_class_margin(ips, torch.from_numpy(self.kernel("train_label")),
                                                 predicted, num_classes).numpy(),
            "max_softmax": logits.softmax(1).max(1).values.numpy(),
            "logit_margin": (top2[:, 0] - top2[:, -1]).numpy(),
            "misclassified": (predicted != labels).numpy(),
            "loss": torch.nn.functional.cross_entropy(logits, labels, reduction="none").numpy(),
        }
