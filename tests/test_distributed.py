"""torchrun with the gloo backend and 2 processes gives the single-process influence matrix."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from conftest import train_tiny
from plgk_cli.store import InfluenceFile


def test_two_ranks_equal_one_process(tmp_path, tiny_npz):
    run = train_tiny(tmp_path / "run", tiny_npz, {"name": "sgd", "lr": 0.1, "momentum": 0.9})
    common = ["replay", "--ckpts", str(run), "--audit-set", "test[0:5]", "--quiet", "--device", "cpu",
              "--target", "loss", "--target", "logits"]
    single = subprocess.run([sys.executable, "-m", "plgk_cli", *common, "--out", str(tmp_path / "one.h5")],
                            capture_output=True, text=True, timeout=120)
    assert single.returncode == 0, single.stderr
    sharded = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              "--nproc-per-node", "2", "-m", "plgk_cli", *common,
                              "--out", str(tmp_path / "two.h5")],
                             capture_output=True, text=True, timeout=300)
    assert sharded.returncode == 0, sharded.stderr[-2000:]
    assert sharded.stdout.count("wrote") == 1  # only rank 0 reports and writes
    with InfluenceFile(tmp_path / "one.h5") as one, InfluenceFile(tmp_path / "two.h5") as two:
        for target in ("loss", "logits"):
            for name in ("influence", "residual", "initial", "final", "trace/true_change",
                         "trace/reconstructed", "by_layer_epoch/signed", "by_layer_epoch/abs"):
                # equal to the last bits: a rank batches fewer audit points through the same
                # kernels, whose blocking can round the final ulp differently
                np.testing.assert_allclose(one.array(target, name), two.array(target, name),
                                           rtol=1e-12, atol=1e-15)
            assert one.metrics(target)["mre"] == pytest.approx(two.metrics(target)["mre"], rel=1e-9)
        np.testing.assert_array_equal(one.update_error, two.update_error)
        np.testing.assert_array_equal(one.audit_index, two.audit_index)
