"""`plgk inspect`: what an influences.h5 found and how faithful it is, for people and machines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from plgk_cli.errors import AuditSpecError, StoreError
from plgk_cli.store import InfluenceFile
from plgk_cli.tasks import HELPFUL_DOWN, HELPFUL_UP, column_direction, quantity_name, sign_sentence
from plgk_cli.tasks.language_model import BYTE_VOCAB, IGNORE, decode


def _label(value):
    """A class label as int, a regression target as a float (or a list of floats), a sequence's
    next-token targets as the text they spell (byte-level tokens) or their ids."""
    value = np.asarray(value)
    if np.issubdtype(value.dtype, np.integer):
        if value.ndim == 0:
            return int(value)
        ids = value[value != IGNORE]
        if len(ids) and ids.min() >= 0 and ids.max() < BYTE_VOCAB:
            return decode(ids)
        return ids.tolist()
    return float(value) if value.ndim == 0 else value.astype(float).tolist()


def _show(label) -> str:
    if isinstance(label, int):
        return str(label)
    if isinstance(label, float):
        return f"{label:.3g}"
    if isinstance(label, str):
        return json.dumps(label, ensure_ascii=False)  # quoted, newlines as \n
    if label and isinstance(label[0], int):
        return "[" + " ".join(map(str, label)) + "]"
    return "[" + ", ".join(f"{v:.3g}" for v in label) + "]"

def summary(f: InfluenceFile) -> dict:
    manifest = f.manifest
    out = {
        "file": str(f.path), "schema_version": int(f.attrs["schema_version"]),
        "rule": f.attrs["rule"], "optimizer": f.attrs["optimizer"],
        "run": {"run_id": manifest["run_id"], "dataset": manifest["dataset"]["spec"],
                "model": manifest["model"]["name"], "steps": manifest["total_steps"],
                "epochs": manifest["epochs"], "batch_size": manifest["batch_size"]},
        "audit_set": f.audit_source, "complete_audit": bool(f.attrs["complete_audit"]),
        "group_by": f.attrs["group_by"] or None, "max_resimulation_drift": f.max_drift, "targets": {},
        "task": f.task, "accepted_update_error": f.attrs.get("accepted_update_error"),
    }
    for target in f.targets:
        infl = f.influence(target)
        residual, true_change = f.array(target, "residual"), f.array(target, "final") - f.array(target, "initial")
        m = f.metrics(target)
        out["targets"][target] = {
            "influence_shape": list(infl.shape), "mre": m["mre"], "lc": m["lc"], "rmre": m["rmre"],
            "max_update_error": m["max_update_error"], "attribution_gap": m["attribution_gap"],
            "residual_share": float(np.abs(residual).mean() / max(np.abs(true_change).mean(), 1e-300)),
            "mean_true_change": float(true_change.mean()),
        }
        quadrature = f.quadrature(target)
        if quadrature:  # each segment's measured completeness error and the pieces its rule used
            pieces = quadrature["sub_intervals"].reshape(len(quadrature["sub_intervals"]), -1)[:, 0]
            out["targets"][target]["quadrature"] = {
                "mean_sub_intervals": float(pieces.mean()), "max_sub_intervals": int(pieces.max(initial=0)),
                "worst_segment_error": float(np.abs(quadrature["segment_error"]).max(initial=0.0))}
        bound = f.error_bound(target)
        if bound is not None:  # the largest per-entry bound against the largest |influence|
            out["targets"][target]["error_bound"] = {
                "max": float(bound.max(initial=0.0)), "max_over_max_influence":
                    float(bound.max(initial=0.0) / max(float(np.abs(infl).max(initial=0.0)), 1e-300))}
        buffer_part = f.buffer_residual(target)
        if buffer_part is not None:  # BatchNorm statistics: their share of the true change
            out["targets"][target]["buffer_share"] = float(
                np.abs(buffer_part).mean() / max(np.abs(true_change).mean(), 1e-300))
    return out


def ranking_direction(f: InfluenceFile, target: str, column: int | None = None, label=None) -> str:
    """The direction that helps the audit point in this column (down, up or none), as the run's task
    states it (tasks.Task.helpful_direction); for logits, up in the audit point's class only."""
    return column_direction(f.helpful_direction(target), column, label)


def helpful_sign(direction: str) -> float:
    """The factor that sorts influences best first: −1 where lowering helps, +1 where raising does
    (and where neither does: then the list starts with the examples that raised the quantity most)."""
    return -1.0 if direction == HELPFUL_DOWN else 1.0


def rank_headings(direction: str, what: str, noun: str = "training examples") -> tuple[str, str]:
    """Titles of the two ranked lists: most helpful and most harmful where one direction helps,
    else those that raised and lowered ``what`` most."""
    if direction in (HELPFUL_DOWN, HELPFUL_UP):
        return f"most helpful {noun}", f"most harmful {noun}"
    return f"{noun} that raised the {what} most", f"{noun} that lowered the {what} most"


def audit_point_row(f: InfluenceFile, audit: int) -> int | None:
    """The influence row of the audit point itself where it is a training example (an audit of the
    train split: self-influence) and that example was audited; else None."""
    origin = audit_origin(f, audit)
    if origin["split"] != "train" or f.train_group is not None:
        return None
    hits = np.nonzero(f.train_index == origin["index"])[0]
    return int(hits[0]) if len(hits) else None


def audit_origin(f: InfluenceFile, audit: int) -> dict:
    """Where audit point ``audit`` comes from: an index into the train or test split (train: the
    audit measures self-influence), or a row of the audit file (.npz, or a prompt of a .jsonl)."""
    index = f.audit_index
    if index is not None:
        split, position = f.audit_split, int(index[audit])
        return {"split": split, "index": position,
                "where": f"{split} index {position}" if split else f"index {position}"}
    name = Path(f.audit_source).name
    return {"split": None, "index": None,
            "where": f"{'prompt' if name.endswith('.jsonl') else 'row'} {audit} of {name}"}


def default_column(target: str, label, column: int | None, width: int) -> int:
    """The column of a many-column target that ``--class`` picks, or its default: ``logits``, the
    true class; ``token-losses`` (one column per position), the first position with a target."""
    if column is None:
        if target == "logits":
            column = int(label)
        else:
            targeted = np.nonzero(np.asarray(label).reshape(-1) != IGNORE)[0]
            column = int(targeted[0]) if len(targeted) else 0
    if not 0 <= column < width:
        raise AuditSpecError(f"--class: {column} is out of range 0..{width - 1}"
                             + (" (a position of the sequence)" if target != "logits" else ""))
    return column


def column_name(target: str) -> str:
    return {"logits": "class", "token-losses": "position"}.get(target, "column")


def check_options(f: InfluenceFile, audit: int | None, k: int, target: str | None, klass: int | None,
                  plot: bool) -> None:
    """What `plgk inspect` was asked for, checked against the file before anything is shown: an
    option that would be ignored (--class without a listing or pictures) is refused, not dropped."""
    if k < 1:
        raise AuditSpecError(f"--top: must be >= 1, got {k}")
    if target is not None and target not in f.targets:
        raise StoreError(f"{f.path}: no target {target!r}; it holds {', '.join(f.targets)}")
    if klass is not None and audit is None and not plot:
        raise AuditSpecError("--class: picks a column of the audit point's listing; give --audit N too")


def top_examples(f: InfluenceFile, audit: int, k: int, target: str | None = None,
                 klass: int | None = None) -> dict:
    target = target or f.targets[0]
    if k < 1:
        raise AuditSpecError(f"--top: must be >= 1, got {k}")
    infl = f.influence(target)
    n_audit = infl.shape[1]
    if not 0 <= audit < n_audit:
        raise AuditSpecError(f"--audit: {audit} is out of range; the file has audit points 0..{n_audit - 1}")
    column = infl[:, audit]
    if klass is not None and column.ndim == 1:
        raise AuditSpecError(f"--class: only for targets of several columns per audit point (logits, "
                             f"token-losses); the file's {target!r} has one")
    raw_label = f.audit_label[audit]
    label = _label(raw_label)
    initial = np.asarray(f.array(target, "initial"))[audit]
    final = np.asarray(f.array(target, "final"))[audit]
    if column.ndim == 2:  # logits: the true class's column; token-losses: the first audited position
        klass = default_column(target, raw_label, klass, column.shape[1])
        column, initial, final = column[:, klass], initial[klass], final[klass]
    group = f.train_group
    rows_index = group if group is not None else f.train_index
    rows_label = group if group is not None else f.train_label
    direction = ranking_direction(f, target, klass, raw_label if np.ndim(raw_label) == 0 else None)
    order = np.argsort(-helpful_sign(direction) * column.astype(np.float64), kind="stable")
    k = min(k, len(order))
    origin = audit_origin(f, audit)
    self_influence = origin["split"] == "train"
    own_row = audit_point_row(f, audit)

    bound = f.error_bound(target)
    if bound is not None:
        bound = bound[:, audit] if bound.ndim == 2 else bound[:, audit, klass]

    def entries(idx):
        return [{"rank": r + 1, ("group" if group is not None else "train_index"): int(rows_index[i]),
                 "label": _label(rows_label[i]), "influence": float(column[i]),
                 **({} if group is not None else {"is_audit_point": bool(i == own_row)}),
                 **({} if bound is None else {"error_bound": float(bound[i])})} for r, i in enumerate(idx)]

    what = quantity_name(target, klass)
    helpful, harmful = rank_headings(direction, what, "training groups" if group is not None else "training examples")
    own = None if own_row is None else {
        "train_index": origin["index"], "rank": int(np.nonzero(order == own_row)[0][0]) + 1, "of": len(order),
        "influence": float(column[own_row])}
    return {"target": target, "class": klass, "column": column_name(target), "audit": audit,
            "audit_index": origin["index"], "audit_split": origin["split"], "audit_where": origin["where"],
            "audit_source": f.audit_source, "self_influence": self_influence, "audit_label": label,
            "initial": float(initial), "final": float(final), "quantity": what, "helpful_direction": direction,
            "sign": sign_sentence(direction, what), "headings": {"helpful": helpful, "harmful": harmful},
            "audit_point_row": own, "helpful": entries(order[:k]), "harmful": entries(order[::-1][:k])}


def format_summary(s: dict) -> str:
    run = s["run"]
    width = max([8, *map(len, s["targets"])])
    lines = [
        f"{s['file']}  (schema v{s['schema_version']})",
        f"run        {run['run_id'][:12]}  {run['model']} on {run['dataset']}, {s['optimizer']}, "
        f"{run['steps']} steps = {run['epochs']} epochs x batch {run['batch_size']}",
        f"audit set  {s['audit_set']}   rule {s['rule']}"
        + ("" if s["complete_audit"] else "   PARTIAL audit (train subset): MRE not meaningful")
        + (f"   grouped by {s['group_by']}" if s["group_by"] else ""),
        f"{'target':<{width}} {'influence':>16} {'MRE':>10} {'rel. MRE':>9} {'LC':>9} {'upd. err':>9} "
        f"{'resid. share':>12} {'mean change':>11}",
    ]
    for name, t in s["targets"].items():
        lines.append(f"{name:<{width}} {'x'.join(map(str, t['influence_shape'])):>16} {t['mre']:>10.3e} "
                     f"{t['rmre']:>9.2e} {t['lc']:>9.6f} {t['max_update_error']:>9.1e} "
                     f"{t['residual_share']:>12.2e} {t['mean_true_change']:>11.4f}")
    lines.append("MRE: mean |Σ influence + residual − true change| over audit points (paper eq. 22); "
                 "LC: their correlation (eq. 23);")
    lines.append("upd. err: worst relative error of the modelled update against the recorded θ_{t+1}−θ_t.")
    for name, t in s["targets"].items():
        if "buffer_share" in t:
            lines.append(f"{name}: the buffers' part of the change (BatchNorm running statistics, stored as "
                         f"buffer_residual) is {t['buffer_share']:.2e} of the mean |true change|; MRE counts it")
    for name, t in s["targets"].items():
        if "quadrature" in t:
            q = t["quadrature"]
            lines.append(f"{name}: quadrature {q['mean_sub_intervals']:.2f} pieces per segment on average (at most "
                         f"{q['max_sub_intervals']}); worst measured segment error {q['worst_segment_error']:.2e}")
        if "error_bound" in t:
            b = t["error_bound"]
            lines.append(f"{name}: error_bound bounds each influence entry's quadrature error (the propagated "
                         f"estimate of h's error with a safety factor: docs/cli.md#rules); the largest is "
                         f"{b['max']:.2e}, {b['max_over_max_influence']:.2e} of the largest |influence|")
    if s.get("accepted_update_error") is not None:
        lines.append(f"update errors up to {s['accepted_update_error']:g} were accepted (--accept-update-error)")
    if s.get("max_resimulation_drift") is not None:
        lines.append(f"sparse checkpoints: worst re-simulation drift {s['max_resimulation_drift']:.2e} "
                     "(re-simulated θ against the stored checkpoints)")
    return "\n".join(lines)


def format_top(t: dict) -> str:
    cls = f", {t.get('column', 'class')} {t['class']}" if t["class"] is not None else ""
    key = "group" if t["helpful"] and "group" in t["helpful"][0] else "train_index"
    marked = t["self_influence"] and key == "train_index"  # a column for the audit point's own row
    lines = [f"audit point {t['audit']} ({t['audit_where']}, label {_show(t['audit_label'])}): {t['target']}{cls} "
             f"went {t['initial']:.4f} -> {t['final']:.4f}"]
    for kind in ("helpful", "harmful"):
        lines.append(f"{t['headings'][kind]}:")
        bounded = bool(t[kind]) and "error_bound" in t[kind][0]
        shown = [_show(e["label"]) for e in t[kind]]
        width = max([5, *map(len, shown)])
        lines.append(f"  {'rank':>4} {key:>12}{' ' if marked else ''} {'label':>{width}} {'influence':>12}"
                     + ("  ± bound" if bounded else ""))
        for e, label in zip(t[kind], shown):
            mark = ("*" if e["is_audit_point"] else " ") if marked else ""
            lines.append(f"  {e['rank']:>4} {e[key]:>12}{mark} {label:>{width}} {e['influence']:>12.4e}"
                         + (f"  ± {e['error_bound']:.1e}" if bounded else ""))
    if marked:
        own = t["audit_point_row"]
        if own is None:
            lines.append(f"the audit point itself (train index {t['audit_index']}) is not among the audited "
                         "training rows")
        else:
            listed = any(e["is_audit_point"] for kind in ("helpful", "harmful") for e in t[kind])
            lines.append(f"{'* ' if listed else ''}the audit point itself (train index {own['train_index']}, "
                         f"self-influence): rank {own['rank']} of {own['of']}, influence {own['influence']:.4e}")
    lines.append(f"({t['sign']}" + (f"; class {t['class']} is not the audit point's label"
                                    if t["target"] == "logits" and t["class"] != t["audit_label"] else "") + ")")
    return "\n".join(lines)


def to_json(obj) -> str:
    """Strict JSON: NaN (e.g. the attribution gap of a partial audit) becomes null."""
    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        if isinstance(x, np.ndarray):
            return clean(x.tolist())
        if isinstance(x, bool | np.bool_):
            return bool(x)
        if isinstance(x, np.integer):
            return int(x)
        if isinstance(x, float | np.floating):
            return float(x) if np.isfinite(x) else None
        return x
    return json.dumps(clean(obj), indent=2, allow_nan=False)


def kernel_summary(f: InfluenceFile) -> dict:
    """The kernel geometry of a replay --kernel/--modes file, and paper Table 1 on its audit set."""
    from plgk_cli.kernel import auroc, average_precision, spearman

    gram = f.kernel("audit_gram")
    eig = np.linalg.eigvalsh(0.5 * (gram + gram.T))
    ips = f.kernel("audit_ips")
    out = {
        "kernel_steps": f.kernel("step").tolist(), "attrs": f.kernel_attrs,
        "audit_gram": {"smallest_over_largest_eigenvalue": float(eig[0] / eig[-1]) if eig[-1] > 0 else None,
                       "max_asymmetry": float(np.abs(gram - gram.T).max())},
        "audit_ips_diagonal": [float(np.diag(ips).min()), float(np.diag(ips).max())],
        "temporal": {"participation_ratio": float(f.kernel_attrs["temporal_participation_ratio"]),
                     "eigenvalues": f.kernel("temporal/eigenvalues").tolist()},
        "regime": {name: f.kernel(f"regime/{name}").tolist()
                   for name in ("feature_overlap", "subspace_overlap", "activation_overlap")},
        "modes": {},
    }
    for name in f.modes:
        attrs = f.mode_attrs(name)
        entry = {"method": attrs["method"]}
        if attrs["method"] == "svd":
            entry.update(step=int(attrs["step"]), singular_values=f.mode(name, "s")[:10].tolist(),
                         **{f"K@{p}%": int(attrs[f"k_at_{p}"]) for p in (90, 95, 99)})
            if "k" in attrs:  # schema 6: how the SVD chose K and how accurate its values are
                entry.update(k=int(attrs["k"]), energy_target=float(attrs["energy_target"]) or None,
                             energy_held=float(f.mode(name, "energy_curve")[-1]),
                             converged=bool(attrs["converged"]),
                             estimated_error=float(attrs["estimated_error"]), passes=int(attrs["passes"]))
        else:
            entry["captured_energy"] = f.mode(name, "captured_energy").tolist()
        cr = f.mode(name, "cancellation")  # (kernel checkpoints, N, K)
        entry["mean_cr_all_modes_by_checkpoint"] = np.nanmean(cr[:, :, -1], axis=1).tolist()
        out["modes"][name] = entry
    if not np.issubdtype(f.audit_label.dtype, np.integer) or f.audit_label.ndim != 1:  # Table 1 ranks misclassified points
        out["difficulty"] = None
        return out
    scores = f.difficulty_scores()
    wrong, loss = scores["misclassified"], scores["loss"]
    table = {}
    for name in ("ips_l2_norm", "ips_class_margin", "max_softmax", "logit_margin"):
        s = scores[name]
        ok = np.isfinite(s)
        has_both = wrong[ok].any() and (~wrong[ok]).any()
        table[name] = {"auroc": auroc(-s[ok], wrong[ok]) if has_both else None,
                       "aupr": average_precision(-s[ok], wrong[ok]) if has_both else None,
                       "spearman_vs_neg_loss": spearman(s[ok], -loss[ok])}
    out["difficulty"] = {"misclassified": int(wrong.sum()), "audit_points": int(len(wrong)), "table": table}
    return out


def format_kernel(k: dict) -> str:
    a = k["audit_gram"]
    lines = [f"kernel checkpoints {k['kernel_steps']}  (stride {k['attrs']['stride']}, "
             f"preconditioned: {k['attrs']['precondition']})",
             f"audit PLGK: smallest/largest eigenvalue {a['smallest_over_largest_eigenvalue']:.2e}, "
             f"max |K − Kᵀ| {a['max_asymmetry']:.1e}; IPS diagonal in "
             f"[{k['audit_ips_diagonal'][0]:.9f}, {k['audit_ips_diagonal'][1]:.9f}]",
             f"temporal kernel: participation ratio {k['temporal']['participation_ratio']:.3f}",
             "kernel regime vs final checkpoint (per kernel checkpoint):"]
    for name, values in k["regime"].items():
        lines.append(f"  {name:<20} " + " ".join(f"{v:.3f}" for v in values))
    for name, m in k["modes"].items():
        if m["method"] == "svd":
            unreached = "" if m.get("energy_target") else (
                "(−1: not reached by the computed modes; --modes auto grows K until it is); ")
            lines.append(f"modes {name}: K@90% {m['K@90%']}  K@95% {m['K@95%']}  K@99% {m['K@99%']} "
                         f"{unreached}top s: " + " ".join(f"{v:.3g}" for v in m["singular_values"][:5]))
            if "k" in m:
                held = m["energy_held"] >= m["energy_target"] if m["energy_target"] else True
                chosen = ("as asked" if not m["energy_target"] else
                          f"the fewest that hold {m['energy_target']:g} of the energy" if held else
                          f"they hold {m['energy_held']:.4f} of the energy, SHORT of {m['energy_target']:g}")
                accuracy = (f"every value within {m['estimated_error']:.1e} (estimated)" if m["converged"] else
                            f"NOT converged: estimated error {m['estimated_error']:.1e}")
                lines.append(f"  K {m['k']} ({chosen}); {accuracy}; {m['passes']} passes over the rows")
        else:
            lines.append("oja captured energy: " + " ".join(f"{v:.3f}" for v in m["captured_energy"]))
        lines.append("  mean CR(all modes) per kernel checkpoint: "
                     + " ".join(f"{v:.3f}" for v in m["mean_cr_all_modes_by_checkpoint"]))
    d = k["difficulty"]
    if d is None:
        lines.append("difficulty scores (paper Table 1): for classification runs only")
        return "\n".join(lines)
    lines.append(f"difficulty scores on the audit set ({d['misclassified']} of {d['audit_points']} "
                 "misclassified; paper Table 1):")
    lines.append(f"  {'score':<18} {'AUROC':>7} {'AUPR':>7} {'Spearman(s, −L)':>16}")
    fmt = lambda v: "   n/a" if v is None else f"{v:7.4f}"  # noqa: E731
    for name, row in d["table"].items():
        lines.append(f"  {name:<18} {fmt(row['auroc'])} {fmt(row['aupr'])} {row['spearman_vs_neg_loss']:16.4f}")
    return "\n".join(lines)
