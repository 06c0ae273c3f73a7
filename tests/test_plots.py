"""`plgk inspect --plot DIR`: every picture is written, has its documented pixel size and is not
blank; pictures that do not apply are skipped with a reason; the embedding's maths against
independent references; a missing matplotlib is one line."""

from __future__ import annotations

import inspect as pyinspect
import json
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import train_tiny
from plgk_cli.arguments import ReplayArguments
from plgk_cli.cli import main
from plgk_cli.errors import AuditSpecError, DependencyError, OutputError
from plgk_cli.replay import replay
from plgk_cli.store import InfluenceFile

pytest.importorskip("matplotlib")
from PIL import Image  # noqa: E402  (matplotlib's own dependency)

from plgk_cli.plots import classical_mds, cosine_distance, write_plots  # noqa: E402

WIDE, GRIDS = (1000, 450), (1200, 600)  # pixels: 10 x 4.5 and 12 x 6 inches at 100 dpi
AUDIT = 1


def make_runner() -> CliRunner:
    if "mix_stderr" in pyinspect.signature(CliRunner.__init__).parameters:  # click < 8.2
        return CliRunner(mix_stderr=False)
    return CliRunner()


def expected_files(audit: int, label: int) -> dict:
    return {"completeness.png": WIDE, f"influence_sorted_audit{audit}.png": WIDE,
            f"examples_audit{audit}.png": GRIDS, f"examples_audit{audit}_class{label}.png": GRIDS,
            f"layer_epoch_audit{audit}.png": WIDE, "audit_embedding_influence_cosine.png": WIDE}


def assert_picture(path, size):
    assert path.is_file(), path
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == size, (path.name, image.size)
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    assert pixels.std() > 0, path.name  # not a blank canvas


def write_image_npz(path, n_train=40, n_test=6, seed=0, rgb=False):
    """uint8 'images' in 3 classes: (N, 8, 8), loaded as (N, 1, 8, 8), or (N, 3, 8, 8) colour."""
    rng = np.random.default_rng(seed)
    shape = (3, 8, 8) if rgb else (8, 8)
    np.savez(path, x_train=rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
             y_train=np.arange(n_train) % 3, x_test=rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
             y_test=np.arange(n_test) % 3)
    return path


def audit_file(run_dir, out, **kwargs):
    replay(ReplayArguments(ckpts=str(run_dir), audit_set="test[0:4]", out=str(out), device="cpu",
                           **kwargs), progress=False)
    return out


@pytest.fixture(scope="module")
def image_audit(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    npz = write_image_npz(root / "images.npz", rgb=True)
    run = train_tiny(root / "run", npz, {"name": "adam", "lr": 0.01})
    return {"npz": npz, "run": run, "h5": audit_file(run, root / "influences.h5")}


def test_cli_writes_every_picture(image_audit, tmp_path):
    with InfluenceFile(image_audit["h5"]) as f:
        label = int(f.audit_label[AUDIT])
    result = make_runner().invoke(main, ["inspect", str(image_audit["h5"]), "--audit", str(AUDIT),
                                         "--top", "3", "--plot", str(tmp_path / "plots")])
    assert result.exit_code == 0, result.output + result.stderr
    expected = expected_files(AUDIT, label)
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(expected)
    for name, size in expected.items():
        assert_picture(tmp_path / "plots" / name, size)
    assert f"wrote 6 pictures to {tmp_path / 'plots'}" in result.output
    assert "most helpful training examples" in result.output  # --audit output as without --plot


def test_plots_of_a_feature_run_write_the_examples_as_text(tmp_path, tiny_npz):
    """Feature vectors are no images: their examples are written out as text; the logits target
    plots its true-class columns."""
    run = train_tiny(tmp_path / "run", tiny_npz, {"name": "sgd", "lr": 0.1, "momentum": 0.9})
    h5 = audit_file(run, tmp_path / "f.h5", targets=("loss", "logits"))
    with InfluenceFile(h5) as f:
        report = write_plots(f, tmp_path / "plots", audit=0, target="logits")
        label = int(f.audit_label[0])
    assert sorted(p.name for p in report.written) == sorted(
        ["completeness.png", "influence_sorted_audit0.png", "layer_epoch_audit0.png",
         "audit_embedding_influence_cosine.png", "examples_audit0.png", f"examples_audit0_class{label}.png"])
    for path in report.written:
        if path.name.startswith("examples"):  # as tall as its lines: 1200 px wide
            assert_picture(path, (1200, Image.open(path).size[1]))
        else:
            assert_picture(path, WIDE)
    assert report.skipped == []


def test_grouped_audit_and_changed_data_skip_the_grids(image_audit, tmp_path):
    grouped = audit_file(image_audit["run"], tmp_path / "grouped.h5", group_by="label")
    with InfluenceFile(grouped) as f:
        report = write_plots(f, tmp_path / "grouped")
    assert len(report.written) == 4 and all("grouped audit" in why for _, why in report.skipped)

    # grey images whose data file changes after the replay: the grids would show other images
    npz = write_image_npz(tmp_path / "grey.npz")
    run = train_tiny(tmp_path / "run", npz, {"name": "sgd", "lr": 0.1}, epochs=1)
    h5 = audit_file(run, tmp_path / "grey.h5")
    write_image_npz(npz, seed=1)
    with InfluenceFile(h5) as f:
        report = write_plots(f, tmp_path / "changed")
        assert len(report.written) == 4
        assert all("training images unavailable" in why and "fingerprint" in why
                   for _, why in report.skipped)
        write_image_npz(npz)  # the original data again: the grey grids are drawn
        report = write_plots(f, tmp_path / "grey")
        assert report.skipped == []
        for path in report.written:
            assert_picture(path, GRIDS if path.name.startswith("examples") else WIDE)


def test_bad_arguments(image_audit, tmp_path):
    with InfluenceFile(image_audit["h5"]) as f:
        with pytest.raises(AuditSpecError, match="out of range"):
            write_plots(f, tmp_path / "p", audit=4)
        with pytest.raises(AuditSpecError, match="only for targets of several columns per audit point"):
            write_plots(f, tmp_path / "p", klass=1)
        (tmp_path / "file").write_text("")
        with pytest.raises(OutputError, match="not a directory"):
            write_plots(f, tmp_path / "file")


def test_missing_matplotlib_is_one_line(image_audit, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    with InfluenceFile(image_audit["h5"]) as f:
        with pytest.raises(DependencyError):
            write_plots(f, tmp_path / "plots")
    result = make_runner().invoke(main, ["inspect", str(image_audit["h5"]), "--plot",
                                         str(tmp_path / "plots")])
    assert result.exit_code == DependencyError.exit_code
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["plgk: error: --plot needs matplotlib: pip install 'plgk[plot]' (or pip "
                     "install matplotlib)"]
    assert not (tmp_path / "plots").exists()


def test_json_lists_the_pictures(image_audit, tmp_path):
    result = make_runner().invoke(main, ["inspect", str(image_audit["h5"]), "--json", "--plot",
                                         str(tmp_path / "plots")])
    assert result.exit_code == 0, result.stderr
    plots = json.loads(result.output)["plots"]
    assert len(plots["written"]) == 6 and plots["skipped"] == []


def test_pictures_say_the_targets_sign_and_mark_the_audit_point_itself(image_audit, tmp_path, monkeypatch):
    """Titles take the words of inspect: a margin's helpful end is the positive one, the audit point
    of a train-split audit is named a training index and its own tile is captioned "itself"."""
    from matplotlib.text import Text

    from plgk_cli import plots

    texts, save = {}, plots._save

    def recording_save(fig, path):
        texts[path.name] = "\n".join(t.get_text() for t in fig.findobj(Text))
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", recording_save)
    h5 = tmp_path / "self.h5"
    replay(ReplayArguments(ckpts=str(image_audit["run"]), audit_set="train[0:4]", out=str(h5), device="cpu",
                           targets=("margin", "loss")), progress=False)
    with InfluenceFile(h5) as f:
        write_plots(f, tmp_path / "margin", audit=AUDIT, target="margin")
        margin = dict(texts)
        write_plots(f, tmp_path / "loss", audit=AUDIT, target="loss")
    sign = "influence > 0 pushed the margin up: helpful, a higher margin is better for the audit point"
    assert sign in margin[f"examples_audit{AUDIT}.png"]
    assert "helpful at the right (positive) end" in margin[f"influence_sorted_audit{AUDIT}.png"]
    assert "helpful at the left (negative) end" in texts[f"influence_sorted_audit{AUDIT}.png"]
    assert "influence < 0 pushed the loss down: helpful" in texts[f"examples_audit{AUDIT}.png"]
    for name in (f"examples_audit{AUDIT}.png", f"layer_epoch_audit{AUDIT}.png", f"influence_sorted_audit{AUDIT}.png"):
        assert f"Audit point {AUDIT} (train index {AUDIT}, label " in margin[name], name
    assert f"#{AUDIT} itself" in margin[f"examples_audit{AUDIT}.png"]


# --------------------------------------------------------------------------- embedding maths


def test_cosine_distance_matches_scipy():
    from scipy.spatial.distance import cdist

    columns = np.random.default_rng(0).normal(size=(50, 7))
    np.testing.assert_allclose(cosine_distance(columns), cdist(columns.T, columns.T, "cosine"),
                               atol=1e-12)
    zero = np.zeros((50, 2))
    zero[:, 1] = 1.0
    assert cosine_distance(zero)[0, 1] == 1.0  # a zero column is no direction


def test_classical_mds_recovers_a_planar_configuration():
    """Distances between points of a plane are Euclidean: classical MDS reproduces them exactly,
    with all the eigenvalue mass in two dimensions."""
    points = np.random.default_rng(1).normal(size=(9, 2)) * [3.0, 1.0]
    distance = np.linalg.norm(points[:, None] - points[None], axis=-1)
    coords, share = classical_mds(distance)
    np.testing.assert_allclose(np.linalg.norm(coords[:, None] - coords[None], axis=-1), distance,
                               atol=1e-10)
    assert share.sum() == pytest.approx(1.0) and share[0] > share[1]
    flat = classical_mds(np.abs(np.arange(5.0)[:, None] - np.arange(5.0)[None]))[0]
    assert np.allclose(flat[:, 1], 0, atol=1e-7)  # points on a line need one dimension

