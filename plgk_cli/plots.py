"""`plgk inspect PATH --plot DIR`: PNG pictures of an influences.h5.

Reads the file only through store.InfluenceFile, and the training images through the run's
dataset (the manifest stored in the file names it; run.Run checks its fingerprint). Files, for
audit point n (a position in the audit set) and the chosen target:

  completeness.png                      MRE and LC of the trace at each trace checkpoint
  influence_sorted_audit<n>.png         n's influences sorted, and how fast they add up
  examples_audit<n>.png                 25 most helpful and 25 most harmful training images (for a
                                        target without a helpful direction: those that raised and
                                        lowered it most; inspect's words, tasks' directions)
  examples_audit<n>_class<y>.png        the same among the training examples of n's class y
  layer_epoch_audit<n>.png              Σ_m influence per layer and epoch, signed and absolute
  audit_embedding_influence_cosine.png  the audit points placed by classical MDS of the cosine
                                        distance between their influence columns

matplotlib is optional (``pip install 'plgk[plot]'``); figures are drawn on the Agg canvas without
pyplot, so no window or global backend is involved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from plgk_cli.errors import AuditSpecError, DependencyError, OutputError, PlgkError
from plgk_cli.inspect import (_label, _show, audit_origin, audit_point_row, default_column, helpful_sign,
                              rank_headings, ranking_direction)
from plgk_cli.outputs import remedy, write_failure
from plgk_cli.store import InfluenceFile
from plgk_cli.tasks import HELPFUL_DOWN, HELPFUL_UP, quantity_name, sign_sentence
from plgk_cli.trajectory import MANIFEST, check_not_inside_a_run

DPI = 100
WIDE = (10.0, 4.5)  # inches: 1000 x 450 pixels at DPI
GRID_FIGURE = (12.0, 6.0)  # 1200 x 600 pixels
GRID = 5  # 5 x 5 = 25 examples per grid
EMBEDDING = "audit_embedding_influence_cosine.png"


@dataclass
class PlotReport:
    written: list = field(default_factory=list)  # paths of the PNGs written
    skipped: list = field(default_factory=list)  # (file name, why)


def _figure(size, constrained: bool = True):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise DependencyError("--plot needs matplotlib: pip install 'plgk[plot]' (or pip install "
                              "matplotlib)") from None
    return Figure(figsize=size, dpi=DPI, layout="constrained" if constrained else None)


def write_plots(f: InfluenceFile, out_dir: str | Path, audit: int = 0, target: str | None = None,
                klass: int | None = None) -> PlotReport:
    """Write the PNGs above into out_dir (created if missing; files of the same names are replaced)."""
    _figure((1, 1))  # fail on a missing matplotlib before anything is read or created
    target = target or f.targets[0]
    influence = f.influence(target)  # (R, N[, C]); raises StoreError for an unknown target
    n_audit = influence.shape[1]
    if not 0 <= audit < n_audit:
        raise AuditSpecError(f"--audit: {audit} is out of range; the file has audit points 0..{n_audit - 1}")
    labels = f.audit_label
    if influence.ndim == 3:  # logits: the true class unless --class; token-losses: a position
        classes = np.array([default_column(target, labels[n], klass, influence.shape[2]) for n in range(n_audit)])
        columns = influence[:, np.arange(n_audit), classes]
    else:
        if klass is not None:
            raise AuditSpecError(f"--class: only for targets of several columns per audit point (logits, "
                                 f"token-losses); the file's {target!r} has one")
        classes, columns = None, influence
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"--plot: {out_dir} exists and is not a directory; give a directory")
    if (out_dir / MANIFEST).is_file():
        raise OutputError(f"--plot: {out_dir} is a run directory, which holds only its own files; give "
                          "another directory")
    check_not_inside_a_run(out_dir, "--plot directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_failure(out_dir, exc, "give another --plot directory") from None

    report = PlotReport()
    column_class = None if classes is None else int(classes[audit])
    label = np.asarray(labels[audit])
    direction = ranking_direction(f, target, column_class, int(label) if label.ndim == 0 else None)
    report.written.append(_completeness(f, target, out_dir / "completeness.png"))
    report.written.append(_sorted_influence(f, target, columns[:, audit].astype(np.float64), audit,
                                            column_class, direction, out_dir / f"influence_sorted_audit{audit}.png"))
    _examples(f, quantity_name(target, column_class), columns[:, audit].astype(np.float64), audit, direction,
              out_dir, report)
    report.written.append(_layer_epoch(f, target, audit, column_class,
                                       out_dir / f"layer_epoch_audit{audit}.png"))
    if n_audit < 3:
        report.skipped.append((EMBEDDING, f"needs at least 3 audit points, the file has {n_audit}"))
    else:
        report.written.append(_embedding(columns.astype(np.float64), labels, audit, target,
                                         out_dir / EMBEDDING))
    return report


# ---------------------------------------------------------------------------- completeness


def _completeness(f: InfluenceFile, target: str, path: Path) -> Path:
    steps = f.array(target, "trace/step")
    true = f.array(target, "trace/true_change").reshape(len(steps), -1)
    rebuilt = f.array(target, "trace/reconstructed").reshape(len(steps), -1)
    mre = np.abs(rebuilt - true).mean(1)
    scale = np.abs(true).mean(1)
    lc = np.array([_correlation(r, t) for r, t in zip(rebuilt, true)])
    fig = _figure(WIDE)
    ax_mre, ax_lc = fig.subplots(1, 2)
    later = steps > 0  # at step 0 both sides are 0 by definition
    ax_mre.plot(steps[later], mre[later], "o-", label="MRE  mean |reconstructed − true|")
    ax_mre.plot(steps[later], scale[later], "s--", color="0.5", label="mean |true change|")
    if np.all(mre[later] > 0) and np.all(scale[later] > 0):
        ax_mre.set_yscale("log")
    ax_mre.set_xlabel("update (trace checkpoint)")
    ax_mre.set_title(f"{target}: error of Σ_t Δθ_t·h(t) against the true change")
    ax_mre.legend(fontsize=8)
    ax_lc.plot(steps[later], lc[later], "o-", color="C2")
    ax_lc.set_xlabel("update (trace checkpoint)")
    ax_lc.set_ylabel("LC (correlation over audit points)")
    ax_lc.set_title("linear correlation")
    if np.all(np.isnan(lc[later])):
        ax_lc.text(0.5, 0.5, "LC needs 2 or more audit columns", ha="center", transform=ax_lc.transAxes)
    fig.suptitle(f"Completeness over training (MRE at the end {mre[-1]:.2e}, LC {lc[-1]:.6f})")
    return _save(fig, path)


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denom) if len(a) > 1 and denom > 0 else float("nan")


# ---------------------------------------------------------------------------- one audit point


def _sorted_influence(f: InfluenceFile, target: str, column: np.ndarray, audit: int,
                      klass: int | None, direction: str, path: Path) -> Path:
    residual, initial, final = (np.asarray(f.array(target, k))[audit] for k in ("residual", "initial", "final"))
    if klass is not None:
        residual, initial, final = residual[klass], initial[klass], final[klass]
    what = quantity_name(target, klass)
    fig = _figure(WIDE)
    ax_sorted, ax_sum = fig.subplots(1, 2)
    ordered = np.sort(column)
    ax_sorted.plot(np.arange(1, len(ordered) + 1), ordered, lw=1.5)
    ax_sorted.axhline(0, color="0.5", lw=0.8)
    rows = "training class (grouped audit)" if f.train_group is not None else "training example"
    ax_sorted.set_xlabel(f"{rows}, sorted by influence")
    ax_sorted.set_ylabel(f"influence on the {what}")
    ax_sorted.set_title({HELPFUL_DOWN: "helpful at the left (negative) end, harmful at the right",
                         HELPFUL_UP: "helpful at the right (positive) end, harmful at the left"}.get(
                            direction, f"right: raised the {what}, left: lowered it (neither helpful)"),
                        fontsize=10)
    by_size = column[np.argsort(-np.abs(column), kind="stable")]
    ax_sum.plot(np.arange(1, len(by_size) + 1), np.cumsum(by_size), lw=1.5, label="Σ of the k largest |influence|")
    ax_sum.axhline(final - initial, color="C3", ls="--", label=f"true change {final - initial:+.4f}")
    ax_sum.axhline(column.sum() + residual, color="C2", ls=":", label=f"Σ all + residual {column.sum() + residual:+.4f}")
    ax_sum.set_xscale("log")
    ax_sum.set_xlabel("k (rows, largest |influence| first)")
    ax_sum.set_title("how the influences add up")
    ax_sum.legend(fontsize=8)
    fig.suptitle(f"Audit point {audit}{_where(f, audit)}: {what} went {initial:.4f} -> {final:.4f}")
    return _save(fig, path)


def _where(f: InfluenceFile, audit: int) -> str:
    return f" ({audit_origin(f, audit)['where']}, label {_show(_label(f.audit_label[audit]))})"


def _layer_epoch(f: InfluenceFile, target: str, audit: int, klass: int | None, path: Path) -> Path:
    signed = np.asarray(f.array(target, "by_layer_epoch/signed"))[:, :, audit]  # (E, L[, C])
    gross = np.asarray(f.array(target, "by_layer_epoch/abs"))[:, :, audit]
    if klass is not None:
        signed, gross = signed[..., klass], gross[..., klass]
    layers = f.layers(target)
    epochs, n_layers = signed.shape
    fig = _figure(WIDE)
    axes = fig.subplots(1, 2)
    limit = float(np.abs(signed).max()) or 1.0
    panels = ((axes[0], signed, "RdBu_r", -limit, limit, "signed: Σ_m influence"),
              (axes[1], gross, "viridis", 0.0, float(gross.max()) or 1.0, "gross: Σ_m |influence|"))
    for ax, values, cmap, low, high, title in panels:
        image = ax.imshow(values, cmap=cmap, vmin=low, vmax=high, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(n_layers), layers, rotation=45 if n_layers > 4 else 0, ha="right" if n_layers > 4 else "center")
        ax.set_yticks(range(epochs), [str(e + 1) for e in range(epochs)])
        ax.set_xlabel("layer")
        ax.set_ylabel("epoch")
        ax.set_title(title)
        fig.colorbar(image, ax=ax, shrink=0.9)
        if epochs * n_layers <= 48:  # small enough to print the numbers
            for e in range(epochs):
                for layer in range(n_layers):
                    v = values[e, layer]
                    # dark cells: the ends of RdBu_r, the low end of viridis
                    dark = abs(v) > 0.5 * high if cmap == "RdBu_r" else v < 0.6 * high
                    ax.text(layer, e, f"{v:.2g}", ha="center", va="center", fontsize=7,
                            color="w" if dark else "k")
    fig.suptitle(f"Audit point {audit}{_where(f, audit)}: where the {quantity_name(target, klass)} changed "
                 "(by layer and epoch of the training gradient)")
    return _save(fig, path)


# ---------------------------------------------------------------------------- training images


def _examples(f: InfluenceFile, what: str, column: np.ndarray, audit: int, direction: str,
              out_dir: Path, report: PlotReport) -> None:
    label = _label(f.audit_label[audit])
    classes = isinstance(label, int)
    names = (f"examples_audit{audit}.png",) + ((f"examples_audit{audit}_class{label}.png",) if classes else ())
    if f.train_group is not None:
        report.skipped += [(n, "grouped audit: its rows are classes, not training examples") for n in names]
        return
    in_shape = f.manifest["dataset"]["in_shape"]
    try:
        dataset = _run_dataset(f)
    except PlgkError as exc:  # the other pictures do not need the data
        noun = "images" if _is_image(in_shape) else "examples"
        report.skipped += [(n, f"training {noun} unavailable: {exc}") for n in names]
        return
    if not _is_image(in_shape):  # token ids or features: the examples as text
        everyone = np.arange(len(column))
        scopes = [(names[0], everyone, "all training examples")]
        if classes:
            scopes.append((names[1], everyone[f.train_label == label], f"training examples of class {label}"))
        for name, rows, scope in scopes:
            if len(rows) == 0:
                report.skipped.append((name, f"no audited training example has class {label}"))
                continue
            report.written.append(_examples_text(f, dataset, what, column, rows, scope, audit, direction,
                                                 out_dir / name))
        return
    train_index, train_label = f.train_index, f.train_label
    audit_image = _audit_image(f, dataset, audit)
    score = helpful_sign(direction) * column  # larger = more helpful (or: raised it more)
    own_row = audit_point_row(f, audit)
    everyone = np.arange(len(column))
    same_class = everyone[train_label == label]
    for name, rows, scope in ((names[0], everyone, "all training examples"),
                              (names[1], same_class, f"training examples of class {label}")):
        if len(rows) == 0:
            report.skipped.append((name, f"no audited training example has class {label}"))
            continue
        order = rows[np.argsort(-score[rows], kind="stable")]
        best, worst = _grid_titles(direction, what, score[order[0]], score[order[-1]])
        picked = {best: order[:GRID * GRID], worst: order[::-1][:GRID * GRID]}
        fig = _figure(GRID_FIGURE, constrained=False)  # axes placed by hand in _draw_grids
        _draw_grids(fig, dataset.x_train, train_index, train_label, column, picked, audit_image, label, own_row)
        fig.suptitle(f"Audit point {audit}{_where(f, audit)}, {what}: {scope}\n"
                     f"({sign_sentence(direction, what)})", fontsize=9)
        report.written.append(_save(fig, out_dir / name))


def _grid_titles(direction: str, what: str, first: float, last: float) -> tuple[str, str]:
    """The two grids' titles; says so when a set has no helpful (or no harmful) example at all,
    e.g. within a class. ``first``, ``last``: the scores (larger = better) at the two ends."""
    if direction in (HELPFUL_DOWN, HELPFUL_UP):
        return ("most helpful" if first > 0 else "least harmful (none helped)",
                "most harmful" if last < 0 else "least helpful (none harmed)")
    return (f"raised the {what} most" if first > 0 else f"lowered the {what} least (none raised it)",
            f"lowered the {what} most" if last < 0 else f"raised the {what} least (none lowered it)")


def _examples_text(f: InfluenceFile, dataset, what: str, column: np.ndarray, rows: np.ndarray, scope: str,
                   audit: int, direction: str, path: Path) -> Path:
    """The audit point and its most helpful and harmful training examples among ``rows``, inputs
    written out (token ids, or feature values), for inputs that are not images."""
    def text(x) -> str:
        a = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x).reshape(-1)
        shown = " ".join(str(int(v)) for v in a[:TEXT_WIDTH]) if np.issubdtype(a.dtype, np.integer) else \
            " ".join(f"{v:+.2f}" for v in a[:TEXT_WIDTH // 2])
        return shown + (" …" if len(a) > (TEXT_WIDTH if np.issubdtype(a.dtype, np.integer) else TEXT_WIDTH // 2) else "")

    order = rows[np.argsort(-helpful_sign(direction) * column[rows], kind="stable")]
    own_row = audit_point_row(f, audit)
    audit_x = _audit_image(f, dataset, audit)
    lines = [f"audit point {audit}{_where(f, audit)}: " + ("(input unavailable)" if audit_x is None else text(audit_x)), ""]
    helpful, harmful = rank_headings(direction, what, "examples")
    for title, picked in ((helpful, order[:TEXT_ROWS]), (harmful, order[::-1][:TEXT_ROWS])):
        lines.append(f"{title} among {scope} (influence, index, label: input)")
        for row in picked:
            index = int(f.train_index[row])
            name = f"#{index}" + ("*" if row == own_row else "")
            lines.append(f"  {column[row]:+.2e}  {name:<8}{_show(_label(f.train_label[row])):>6}: "
                         f"{text(dataset.x_train[index])}")
        lines.append("")
    if own_row is not None:
        lines.append(f"* the audit point itself (train index {int(f.train_index[own_row])}, self-influence)")
    fig = _figure((12, 0.15 * len(lines) + 0.5), constrained=False)
    fig.text(0.01, 0.99, "\n".join(lines), family="monospace", fontsize=8, va="top")
    fig.suptitle(sign_sentence(direction, what), fontsize=9, y=0.02, va="bottom")
    return _save(fig, path)


TEXT_ROWS = 10  # examples listed per block of the text picture
TEXT_WIDTH = 32  # token ids (or half as many feature values) shown per example


def _is_image(in_shape: list) -> bool:
    return len(in_shape) == 2 or (len(in_shape) == 3 and in_shape[0] in (1, 3))


def _run_dataset(f: InfluenceFile):
    from plgk_cli.run import Run

    # The manifest names the data; Run.dataset loads them and refuses changed data (fingerprint).
    return Run(Path(f.arguments.get("ckpts", ".")), f.manifest).dataset


def _audit_image(f: InfluenceFile, dataset, audit: int):
    if f.audit_index is not None and f.audit_split in ("train", "test"):
        return dataset.split(f.audit_split)[0][int(f.audit_index[audit])]
    try:
        from plgk_cli.arguments import resolve_audit_set

        return resolve_audit_set(f.audit_source, dataset).x[audit]
    except PlgkError:
        return None  # the audit npz moved: the grids still show the training examples


def _to_rgb(x) -> np.ndarray:
    """(C, H, W) or (H, W) tensor -> (H, W[, 3]) in [0, 1], each image stretched to its own range
    (py: datasets may be normalised to any range)."""
    a = np.asarray(x.detach().cpu().double() if hasattr(x, "detach") else x, dtype=np.float64)
    if a.ndim == 3:
        a = a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)
    low, high = a.min(), a.max()
    return (a - low) / (high - low) if high > low else np.zeros_like(a)


def _draw_grids(fig, x_train, train_index, train_label, column, picked: dict, audit_image, label,
                own_row: int | None = None):
    """The audit image on the left, then one 5 x 5 mosaic per block of ``picked``. Each mosaic is
    a single image with a caption band above every tile: one Axes per block, not per example,
    keeps drawing fast. ``own_row``: the audit point's own training row, captioned "itself"."""
    ax = fig.add_axes([0.01, 0.30, 0.11, 0.40])
    if audit_image is not None:
        image = _to_rgb(audit_image)
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(f"audit point\nlabel {label}", fontsize=9)
    ax.set_axis_off()
    for block, (title, rows) in enumerate(picked.items()):
        ax = fig.add_axes([0.14 + block * 0.43, 0.01, 0.42, 0.87])
        tiles = [_to_rgb(x_train[int(train_index[row])]) for row in rows]
        captions = [f"#{int(train_index[row])}{' itself' if row == own_row else ''} y={int(train_label[row])}\n"
                    f"{column[row]:+.1e}" for row in rows]
        _mosaic(ax, tiles, captions)
        ax.set_title(title, fontsize=10)
        ax.set_axis_off()


def _mosaic(ax, tiles: list, captions: list) -> None:
    height, width = tiles[0].shape[:2]
    band, gap = max(2, round(0.45 * height)), max(1, round(0.12 * width))  # caption band, gutter
    cell_h, cell_w = height + band, width + gap
    canvas = np.ones((GRID * cell_h, GRID * cell_w - gap, 3))  # white background
    for k, (tile, caption) in enumerate(zip(tiles, captions)):
        top, left = (k // GRID) * cell_h + band, (k % GRID) * cell_w
        canvas[top:top + height, left:left + width] = tile[..., None] if tile.ndim == 2 else tile
        ax.text(left + width / 2, top - 0.5, caption, ha="center", va="bottom", fontsize=6,
                linespacing=1.0)
    ax.imshow(canvas, vmin=0, vmax=1, interpolation="nearest")


# ---------------------------------------------------------------------------- embedding


def classical_mds(distance: np.ndarray, dims: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Torgerson's classical MDS: coordinates (N, dims) from the top eigenvectors of
    B = −½ J D² J (J the centring matrix), and the share of the positive eigenvalue mass each
    dimension carries. Negative eigenvalues (D need not be Euclidean) are dropped."""
    n = len(distance)
    centring = np.eye(n) - 1.0 / n
    b = -0.5 * centring @ (distance ** 2) @ centring
    values, vectors = np.linalg.eigh((b + b.T) / 2)
    top = np.argsort(values)[::-1][:dims]
    kept = np.clip(values[top], 0, None)
    positive = values[values > 0].sum()
    share = kept / positive if positive > 0 else np.zeros_like(kept)
    return vectors[:, top] * np.sqrt(kept), share


def cosine_distance(columns: np.ndarray) -> np.ndarray:
    """1 − cos between the columns of (R, N); a zero column is at distance 1 from every other."""
    norms = np.linalg.norm(columns, axis=0)
    unit = columns / np.where(norms > 0, norms, 1.0)
    distance = 1.0 - np.clip(unit.T @ unit, -1.0, 1.0)
    np.fill_diagonal(distance, 0.0)
    return distance


def _embedding(columns: np.ndarray, labels: np.ndarray, audit: int, target: str, path: Path) -> Path:
    coords, share = classical_mds(cosine_distance(columns))
    fig = _figure(WIDE)
    ax = fig.subplots()
    if labels.ndim > 1:  # a sequence's targets (language models): no classes to colour by
        labels = np.zeros(len(labels), dtype=np.int64)
    classes = np.unique(labels)
    for i, c in enumerate(classes):
        mine = labels == c
        ax.scatter(coords[mine, 0], coords[mine, 1], s=25, color=f"C{i % 10}", label=f"label {c}")
    ax.scatter(coords[audit, 0], coords[audit, 1], s=160, facecolors="none", edgecolors="k",
               linewidths=1.5, label=f"audit point {audit}")
    if len(labels) <= 100:
        for n, (px, py) in enumerate(coords):
            ax.annotate(str(n), (px, py), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.set_xlabel(f"MDS 1 ({share[0]:.0%} of the positive eigenvalue mass)")
    ax.set_ylabel(f"MDS 2 ({share[1]:.0%})" if len(share) > 1 else "MDS 2")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_title(f"Audit points by how alike training moved them\nclassical MDS of the cosine "
                 f"distance between their {target} influence columns", fontsize=10)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    try:
        fig.savefig(path, dpi=DPI)
    except OSError as exc:
        raise write_failure(path, exc, f"{remedy(exc)}, or give another --plot directory") from None  # no bbox_inches="tight": every PNG keeps its documented pixel size
    return path
