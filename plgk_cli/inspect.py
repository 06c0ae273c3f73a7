"""`plgk inspect`: what an influences.h5 found and how faithful it is, for people and machines."""

from __future__ import annotations

import json

import numpy as np

from plgk_cli.errors import AuditSpecError
from plgk_cli.store import InfluenceFile

def summary(f: InfluenceFile) -> dict:
    manifest = f.manifest
    out = {
        "file": str(f.path), "schema_version": int(f.attrs["schema_version"]),
        "rule": f.attrs["rule"], "optimizer": f.attrs["optimizer"],
        "run": {"run_id": manifest["run_id"], "dataset": manifest["dataset"]["spec"],
                "model": manifest["model"]["name"], "steps": manifest["total_steps"],
                "epochs": manifest["epochs"], "batch_size": manifest["batch_size"]},
        "audit_set": f.audit_source, "complete_audit": bool(f.attrs["complete_audit"]),
        "group_by": f.attrs["group_by"] or None, "targets": {},
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
    return out


def helpful_sign(target: str, klass: int | None = None, label: int | None = None) -> float:
    """+1 where pushing the audited quantity up helps the audit point, −1 where pushing it down does:
    down for the loss and for a wrong class's logit; up for the true-class logit and the margin."""
    if target == "loss" or (target == "logits" and klass != label):
        return -1.0
    return 1.0


def top_examples(f: InfluenceFile, audit: int, k: int, target: str | None = None,
                 klass: int | None = None) -> dict:
    target = target or f.targets[0]
    if k < 1:
        raise AuditSpecError(f"--top: must be >= 1, got {k}")
    infl = f.influence(target)
    n_audit = infl.shape[1]
    if not 0 <= audit < n_audit:
        raise AuditSpecError(f"--audit: {audit} is out of range; the file has audit points 0..{n_audit - 1}")
    if klass is not None and target != "logits":
        raise AuditSpecError(f"--class: only for --target logits (the file's {target!r} has one column "
                             "per audit point)")
    label = int(f.audit_label[audit])
    column = infl[:, audit]
    initial = np.asarray(f.array(target, "initial"))[audit]
    final = np.asarray(f.array(target, "final"))[audit]
    if column.ndim == 2:  # logits: one class's column, the true class unless --class
        klass = label if klass is None else klass
        if not 0 <= klass < column.shape[1]:
            raise AuditSpecError(f"--class: {klass} is out of range 0..{column.shape[1] - 1}")
        column, initial, final = column[:, klass], initial[klass], final[klass]
    group = f.train_group
    rows_index = group if group is not None else f.train_index
    rows_label = group if group is not None else f.train_label
    sign = helpful_sign(target, klass, label)
    order = np.argsort(-sign * column.astype(np.float64), kind="stable")
    k = min(k, len(order))

    def entries(idx):
        return [{"rank": r + 1, ("group" if group is not None else "train_index"): int(rows_index[i]),
                 "label": int(rows_label[i]), "influence": float(column[i])} for r, i in enumerate(idx)]

    index = f.audit_index
    return {"target": target, "class": klass, "audit": audit,
            "audit_index": None if index is None else int(index[audit]), "audit_label": label,
            "initial": float(initial), "final": float(final), "helpful_direction":
            "down" if sign < 0 else "up", "helpful": entries(order[:k]), "harmful": entries(order[::-1][:k])}


def format_summary(s: dict) -> str:
    run = s["run"]
    lines = [
        f"{s['file']}  (schema v{s['schema_version']})",
        f"run        {run['run_id'][:12]}  {run['model']} on {run['dataset']}, {s['optimizer']}, "
        f"{run['steps']} steps = {run['epochs']} epochs x batch {run['batch_size']}",
        f"audit set  {s['audit_set']}   rule {s['rule']}"
        + ("" if s["complete_audit"] else "   PARTIAL audit (train subset): MRE not meaningful")
        + (f"   grouped by {s['group_by']}" if s["group_by"] else ""),
        f"{'target':<8} {'influence':>16} {'MRE':>10} {'rel. MRE':>9} {'LC':>9} {'upd. err':>9} "
        f"{'resid. share':>12} {'mean change':>11}",
    ]
    for name, t in s["targets"].items():
        lines.append(f"{name:<8} {'x'.join(map(str, t['influence_shape'])):>16} {t['mre']:>10.3e} "
                     f"{t['rmre']:>9.2e} {t['lc']:>9.6f} {t['max_update_error']:>9.1e} "
                     f"{t['residual_share']:>12.2e} {t['mean_true_change']:>11.4f}")
    lines.append("MRE: mean |Σ influence + residual − true change| over audit points (paper eq. 22); "
                 "LC: their correlation (eq. 23);")
    lines.append("upd. err: worst relative error of the modelled update against the recorded θ_{t+1}−θ_t.")
    return "\n".join(lines)


def format_top(t: dict) -> str:
    where = f"index {t['audit_index']}" if t["audit_index"] is not None else "from the audit file"
    cls = f", class {t['class']}" if t["class"] is not None else ""
    key = "group" if t["helpful"] and "group" in t["helpful"][0] else "train_index"
    lines = [f"audit point {t['audit']} ({where}, label {t['audit_label']}): {t['target']}{cls} went "
             f"{t['initial']:.4f} -> {t['final']:.4f}"]
    for kind in ("helpful", "harmful"):
        lines.append(f"most {kind} training {'groups' if key == 'group' else 'examples'}:")
        lines.append(f"  {'rank':>4} {key:>12} {'label':>5} {'influence':>12}")
        for e in t[kind]:
            lines.append(f"  {e['rank']:>4} {e[key]:>12} {e['label']:>5} {e['influence']:>12.4e}")
    lines.append(f"(influence < 0 pushed the {t['target']}{cls} down; helpful = pushed it "
                 f"{t['helpful_direction']})")
    return "\n".join(lines)


def to_json(obj) -> str:
    """Strict JSON: NaN (e.g. the attribution gap of a partial audit) becomes null."""
    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        if isinstance(x, float | np.floating):
            return float(x) if np.isfinite(x) else None
        return x
    return json.dumps(clean(obj), indent=2, allow_nan=False)
