"""torchrun with the gloo backend and 2 processes: --shard rows and --shard audit write the
single-process file, and a rank killed in the middle of a commit resumes to it.

Equal means every dataset and attribute of the output file equal to the single-process one's:
integers and strings exactly, floats within 1e-12 of the dataset's largest entry (float32 ones
within one unit in the last place; relative errors within 1e-12, each segment's Δθ·h − Δq within
1e-12 of the largest Δq). A rank computes the per-example gradients of its block of a
minibatch (or of its audit points) through the same kernels, and each influence entry is summed
over the same steps in the same order; but a rank's GEMMs have other shapes, and MKL's blocking of
another shape can round the last bit of a float64 sum differently (seen in the float64
by-layer sums, ~1e-16 of their largest entry). Float32 runs agree to the float32 rounding of the
per-example gradients (MKL rounds a GEMM of 4 rows differently from one of 8): see
test_float32_rows_agree_to_float32_rounding.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import train_tiny
from plgk_cli.arguments import ReplayArguments
from plgk_cli.distributed import RowExchange, Shard, _shared_directory, newest_common
from plgk_cli.errors import AuditSpecError
from plgk_cli.progress import commit, peek, previous_path, progress_path
from plgk_cli.replay import plan_replay, replay
from plgk_cli.sharding import shard_plan
from plgk_cli.store import InfluenceFile

replay_module = importlib.import_module("plgk_cli.replay")  # the package's `replay` is the function
WORKER = Path(__file__).with_name("distributed_worker.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
TARGETS = ("loss", "logits")


def _torchrun(args: list, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(TORCHRUN + args, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _datasets(path: Path) -> dict:
    """Every dataset of an output file by name, and every attribute (as datasets named @attr)."""
    found = {}
    with h5py.File(path, "r") as f:
        def visit(name, node):
            for key, value in node.attrs.items():
                found[f"{name}@{key}"] = np.asarray(value)
            if isinstance(node, h5py.Dataset):
                found[name] = node[()]
        f.visititems(visit)
        for key, value in f.attrs.items():
            found[f"@{key}"] = np.asarray(value)
    return found


# Relative errors whose exact value is 0 (a float64 run's hold rounding alone, ~1e-16): their
# own largest entry is no scale, 1 is (1e-12 absolute still tells a check or a walk that is off).
RELATIVE_ERRORS = ("replay/update_error", "@max_update_error", "@attribution_gap")


def _scale(datasets: dict, name: str) -> float:
    """What a float dataset's differences are measured against: its largest entry; 1 for a
    relative error; for a segment's Δθ·h − Δq, whose rounding is that of Δq, its target's
    largest true change."""
    if name.endswith(RELATIVE_ERRORS):
        return 1.0
    if name.endswith("/quadrature/segment_error"):
        name = name.replace("/quadrature/segment_error", "/trace/true_change")
    return float(np.abs(datasets[name]).max()) if datasets[name].size else 0.0


def _assert_same_file(expected: Path, actual: Path) -> None:
    """Every dataset and attribute equal, floats to 1e-12 of their scale (``_scale``): a rank's
    GEMMs (fewer audit columns, fewer rows) go through MKL's blocking of other shapes, which can
    round the last bit of a float64 sum differently; the influence, stored in float32, may then
    round to the neighbouring float32 (one unit in the last place)."""
    a, b = _datasets(expected), _datasets(actual)
    assert sorted(a) == sorted(b)
    for name in a:
        if name.endswith("@created") or name.endswith("@plgk_version"):
            continue
        if a[name].dtype.kind not in "fc":
            assert np.array_equal(a[name], b[name]), name
            continue
        scale = _scale(a, name)
        if a[name].dtype == np.float32:
            ulp = np.spacing(np.maximum(np.abs(a[name]), np.abs(b[name])))
            assert (np.abs(a[name] - b[name]) <= np.maximum(ulp, 1e-12 * scale)).all(), name
        else:
            np.testing.assert_allclose(b[name], a[name], rtol=0, atol=1e-12 * scale, err_msg=name)


# (name, how it trains, replay options): the optimizers and options the sharded walk must keep exact
RUNS = {
    "adam": ({"optim": {"name": "adam", "lr": 0.05}}, {"kernel": True, "modes": 2}),
    # a tolerance at which the adaptive rule refines: every rank must refine the segments one process does
    "sgd-momentum": ({"optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9}}, {"rule": "adaptive:1e-3"}),
    "sparse": ({"optim": {"name": "adamw", "lr": 0.05, "weight_decay": 0.1, "clip_grad_norm": 0.5},
                "checkpoint_every": 4, "epochs": 3}, {"rule": "supersample:2", "stride": 2}),
    "dropout": ({"optim": {"name": "adamw", "lr": 0.05}, "dtype": "float32",
                 "model": {"name": "mlp", "kwargs": {"hidden": 6, "dropout": 0.2}}}, {}),
    # faithful and partial: the update check takes ∇L_B from the replayed forward and cannot see a
    # wrong block of the credited rows, so only the comparison with one process does
    "dropout-partial": ({"optim": {"name": "adam", "lr": 0.05},
                         "model": {"name": "mlp", "kwargs": {"hidden": 6, "dropout": 0.2}}},
                        {"train_subset": "train[3:17]", "group_by": "label"}),
}


def _train(out: Path, npz: Path, how: dict) -> Path:
    from plgk_cli.config import parse_config
    from plgk_cli.train import train
    from conftest import tiny_config

    config = tiny_config(npz, how["optim"], how.get("dtype", "float64"), how.get("epochs", 2), 8,
                         how.get("model"), device="cpu")
    if "checkpoint_every" in how:
        config["checkpoint"] = {"every": how["checkpoint_every"]}
    train(parse_config(config), out, progress=False)
    return out


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tiny_npz):
    """Each run replayed by one process (in this one) and by 2 torchrun ranks with --shard rows,
    audit and auto (the shared-memory exchange), and rows over gloo's all-gather, in one launch."""
    d = tmp_path_factory.mktemp("sharded")
    specs, singles = [], {}
    for name, (how, options) in RUNS.items():
        run = _train(d / name, tiny_npz, how)
        common = dict(ckpts=str(run), audit_set="test[0:5]", targets=TARGETS, device="cpu", **options)
        singles[name] = d / f"{name}-one.h5"
        replay(ReplayArguments(**common, out=str(singles[name])), progress=False)
        for shard in ("rows", "audit", "auto"):
            specs.append({**common, "out": str(d / f"{name}-{shard}.h5"), "shard": shard})
        specs.append({**common, "out": str(d / f"{name}-rows-gloo.h5"), "shard": "rows",
                      "row_exchange": "gloo"})
    (d / "specs.json").write_text(json.dumps(specs))
    result = _torchrun([str(WORKER), str(d / "specs.json")])
    assert result.returncode == 0, result.stderr[-3000:]
    return d, singles, result.stdout


@pytest.mark.parametrize("name", sorted(RUNS))
@pytest.mark.parametrize("shard", ["rows", "audit", "auto", "rows-gloo"])
def test_two_ranks_write_the_single_process_file(sharded, name, shard):
    d, singles, _ = sharded
    _assert_same_file(singles[name], d / f"{name}-{shard}.h5")


def test_each_replay_says_how_it_was_sharded_and_rows_divide_the_gradients(sharded):
    d, _, _ = sharded
    said = {(str(path).rsplit(".rank", 1)[0], int(path.suffixes[-2][len(".rank"):])): json.loads(path.read_text())
            for path in d.glob("*.h5.rank*.json")}
    for name in RUNS:
        rows, audit = (said[str(d / f"{name}-{shard}.h5"), 0]["sharding"] for shard in ("rows", "audit"))
        assert rows == "sharded by training rows and audit points over 2 ranks (--shard rows)"
        assert audit == "sharded by audit points over 2 ranks (--shard audit)"
        auto = said[str(d / f"{name}-auto.h5"), 0]["sharding"]
        assert "(--shard auto: a per-example gradient took " in auto and "ms, exchanging it " in auto, auto
        for shard in ("rows", "rows-gloo"):  # each rank computes its block of every minibatch, no more
            shares = [said[str(d / f"{name}-{shard}.h5"), rank]["row_share"] for rank in (0, 1)]
            assert sum(shares) == pytest.approx(1.0) and max(shares) <= 0.6, (name, shard, shares)
        assert all(said[str(d / f"{name}-audit.h5"), rank]["row_share"] == 0.0 for rank in (0, 1))


def test_float32_rows_agree_to_float32_rounding(tmp_path, tiny_npz):
    run = train_tiny(tmp_path / "run", tiny_npz, {"name": "adam", "lr": 0.05}, dtype="float32")
    common = ["replay", "--ckpts", str(run), "--audit-set", "test[0:5]", "--quiet", "--device", "cpu"]
    replay(ReplayArguments(ckpts=str(run), audit_set="test[0:5]", device="cpu", out=str(tmp_path / "one.h5")),
           progress=False)
    result = _torchrun(["-m", "plgk_cli", *common, "--shard", "rows", "--out", str(tmp_path / "two.h5")])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("wrote") == 1  # only rank 0 reports and writes
    with InfluenceFile(tmp_path / "one.h5") as one, InfluenceFile(tmp_path / "two.h5") as two:
        a, b = one.array("loss", "influence"), two.array("loss", "influence")
        assert np.abs(a - b).max() <= 1e-6 * np.abs(a).max()
        assert one.metrics("loss")["mre"] == pytest.approx(two.metrics("loss")["mre"], rel=1e-5)
        np.testing.assert_allclose(one.update_error, two.update_error, rtol=0, atol=1e-7)


def _rows_replay(run: Path, out: Path, commit_every: int) -> list:
    """`python -m plgk_cli replay` of ``run`` on test[0:5] with --shard rows (torchrun's arguments)."""
    return ["-m", "plgk_cli", "replay", "--ckpts", str(run), "--audit-set", "test[0:5]", "--quiet",
            "--device", "cpu", "--target", "loss", "--target", "logits", "--shard", "rows",
            "--commit-every", str(commit_every), "--out", str(out)]


def _single_process(run: Path, out: Path) -> Path:
    replay(ReplayArguments(ckpts=str(run), audit_set="test[0:5]", targets=TARGETS, device="cpu", out=str(out)),
           progress=False)
    return out


def test_a_rank_killed_before_a_commit_resumes_to_the_uninterrupted_result(tmp_path, tiny_npz):
    """Rank 1 is SIGKILLed just before its third commit: rank 0 may hold that step, rank 1 holds
    the one before. The resume starts both from the step both hold, and is killed the same way
    before its first commit (every 2 updates now, so its commits are of other steps than the
    first run's): the step they resumed from must still be held by both. The last resume lands
    on the file an uninterrupted single process writes."""
    run = _train(tmp_path / "run", tiny_npz, RUNS["sgd-momentum"][0])
    out = tmp_path / "two.h5"
    common = _rows_replay(run, out, commit_every=1)
    killed = _torchrun(common, {"PLGK_FAULT": "before_commit:3:KILL", "PLGK_FAULT_RANK": "1"})
    assert killed.returncode != 0 and not out.exists()
    held = [{peek(p)["walk"]["next_step"] for p in (progress_path(out, r), previous_path(progress_path(out, r)))
             if p.exists()} for r in (0, 1)]
    newest = min(held[1])  # rank 1 holds its first two commits; rank 0 the same, or its third too
    assert len(held[1]) == 2 and held[0] in (held[1], {newest, newest - 1})
    assert newest_common([sorted(h) for h in held]) == newest
    again = _torchrun([*common, "--resume", "--commit-every", "2"],
                      {"PLGK_FAULT": "before_commit:1:KILL", "PLGK_FAULT_RANK": "1"})
    assert again.returncode != 0 and not out.exists()
    for r in (0, 1):  # a commit of a step that not every rank reached must not push the shared one out
        steps = [peek(p)["walk"]["next_step"] for p in (progress_path(out, r), previous_path(progress_path(out, r)))
                 if p.exists()]
        assert newest in steps, (r, steps)
    resumed = _torchrun(common + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_file(_single_process(run, tmp_path / "one.h5"), out)
    assert not any(tmp_path.glob("two.h5.progress*"))


def test_a_signal_to_one_rank_stops_every_rank_at_one_committed_step(tmp_path, tiny_npz):
    """SIGTERM to rank 1 right after its first commit: the ranks agree on the stop one boundary
    later, both commit that step and exit 130; the resume lands on the single-process file."""
    run = _train(tmp_path / "run", tiny_npz, RUNS["adam"][0])
    out = tmp_path / "two.h5"
    common = _rows_replay(run, out, commit_every=3)
    stopped = _torchrun(common, {"PLGK_FAULT": "after_commit:1:TERM", "PLGK_FAULT_RANK": "1"})
    assert stopped.returncode != 0 and not out.exists()
    assert stopped.stderr.count("replay stopped at step") == 2, stopped.stderr[-3000:]  # both ranks, one step
    steps = [peek(progress_path(out, r))["walk"]["next_step"] for r in (0, 1)]
    first = peek(previous_path(progress_path(out, 1)))["walk"]["next_step"]
    # rank 1 asks at the boundary of its first commit; every rank stops at the next one
    assert steps[0] == steps[1] == first - 1, (steps, first)
    resumed = _torchrun(common + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_file(_single_process(run, tmp_path / "one.h5"), out)


def test_ghost_cannot_shard_rows(tmp_path, tiny_npz):
    run = train_tiny(tmp_path / "run", tiny_npz, {"name": "sgd", "lr": 0.1})
    args = ReplayArguments(ckpts=str(run), audit_set="test[0:4]", out=str(tmp_path / "o.h5"), rule="euler",
                           ghost=True, shard="rows", device="cpu")
    with pytest.raises(AuditSpecError, match="--shard rows: --ghost"):
        shard_plan(plan_replay(args), args, Shard(0, 2))


def test_newest_common_step():
    assert newest_common([[3, 5], [3, 5]]) == 3
    assert newest_common([[3, 5], [5, 7]]) == 5  # rank 0 committed step 3, rank 1 was killed before it
    assert newest_common([[3], [5]]) is None
    assert newest_common([[], [5]]) is None


@pytest.mark.parametrize("n", [1, 3, 8, 9])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_row_blocks_laid_end_to_end_are_the_minibatch(n, world):
    blocks = [Shard(r, world).row_slice(n) for r in range(world)]
    assert [i for s in blocks for i in range(s.start, s.stop)] == list(range(n))
    b = Shard(0, world).block_rows(n)
    assert all(s.start == min(r * b, n) for r, s in enumerate(blocks))  # block r starts at row r*b


def test_a_commit_keeps_the_one_before(tmp_path):
    import torch

    path = tmp_path / "out.h5.progress.rank0"
    for step in (7, 5):
        commit(path, {"x": torch.full((2,), float(step))}, {"walk": {"next_step": step}}, keep_previous=True)
    assert peek(path)["walk"]["next_step"] == 5
    assert peek(previous_path(path))["walk"]["next_step"] == 7


def test_no_room_for_the_shared_rows_is_one_clear_error(monkeypatch):
    import errno

    import torch

    from plgk_cli.distributed import SINGLE, SharedMemoryExchange
    from plgk_cli.errors import OutputError

    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    exchange = SharedMemoryExchange(SINGLE)
    with pytest.raises(OutputError, match=r"--shard rows: no room for \d+ MiB of shared memory .*--shard audit"):
        exchange.rows("train", 256, 61706, torch.float64, torch.device("cpu"))
    directory = Path(_shared_directory())
    assert not list(directory.glob(f"plgk-rows-{exchange._token}-*"))  # the file it tried is gone


def test_each_update_is_checked_by_one_rank():
    for world in (1, 2, 3):
        assert all(sum(Shard(r, world).checks_update(t) for r in range(world)) == 1 for t in range(7))


def test_no_room_in_shared_memory_for_a_walk_is_no_file(monkeypatch, tmp_path):
    import torch

    from plgk_cli.distributed import save_to_shared_memory

    def full(obj, path):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full)
    assert save_to_shared_memory({"x": torch.zeros(3)}, "walk-test") is None  # gather_object then
    directory = Path(_shared_directory())
    assert not list(directory.glob("plgk-walk-test-*"))


class _InProcessExchange(RowExchange):
    """The ranks of one process, one after another: every rank's rows land in one tensor."""

    def __init__(self, shard: Shard, shared: dict):
        super().__init__(shard)
        self.shared = shared

    def rows(self, name, n, width, dtype, device):
        b = self.shard.block_rows(n)
        full = self.shared.setdefault(name, torch.full((self.shard.world * b, width), float("nan"), dtype=dtype))
        return full, full[self.shard.rank * b:(self.shard.rank + 1) * b]

    def gather(self, full, own):
        return full


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_sum_shares_of_the_batch_gradient_to_the_single_process_vector(monkeypatch, tmp_path, tiny_npz, world):
    """ReplayPlan.batch_gradient in chunks of 8 columns (the tiny MLP's 63 parameters: 8 chunks):
    the ranks' shares laid together equal the single process's vector bit for bit, and that
    equals Σ_m w_m g_m summed by explicit loops."""
    monkeypatch.setattr(replay_module, "CHECK_COLUMNS", 8)
    run = train_tiny(tmp_path / "run", tiny_npz, {"name": "adam", "lr": 0.05})
    plan = plan_replay(ReplayArguments(ckpts=str(run), audit_set="test[0:5]", device="cpu", out=str(tmp_path / "a.h5")))
    g = torch.randn(6, plan.layout.size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for weights in (None, torch.rand(6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))):
        single = plan.batch_gradient(g, weights).clone()
        w = [1 / 6] * 6 if weights is None else weights.tolist()
        naive = torch.tensor([sum(w[m] * float(g[m, p]) for m in range(6)) for p in range(plan.layout.size)],
                             dtype=torch.float64)
        assert torch.allclose(single, naive, rtol=1e-14, atol=1e-15)
        shared: dict = {}
        for rank in range(world):
            shard = Shard(rank, world)
            dataclasses.replace(plan, shard=shard, exchange=_InProcessExchange(shard, shared)).batch_gradient(g, weights)
        assert torch.equal(shared["batch_gradient"].reshape(-1)[:plan.layout.size], single)
