"""The public API (plgk_cli.load_run, read_influences, train, replay) names functions whatever
has been imported: `import plgk_cli.replay` binds the package's `replay` to the module, which
must then still call the function."""

from __future__ import annotations

import importlib
import pkgutil

import plgk_cli
from conftest import train_tiny
from plgk_cli.arguments import ReplayArguments
from plgk_cli.config import parse_config


def test_every_module_imported_then_the_api_is_called(tmp_path, tiny_npz):
    for module in pkgutil.walk_packages(plgk_cli.__path__, "plgk_cli."):
        if module.name != "plgk_cli.__main__":  # that one runs the command line
            importlib.import_module(module.name)
    assert callable(plgk_cli.replay) and callable(plgk_cli.train)
    config = parse_config({"data": {"dataset": f"npz:{tiny_npz}"}, "model": {"name": "mlp", "kwargs": {"hidden": 4}},
                           "train": {"epochs": 1, "batch_size": 8, "device": "cpu"}})
    manifest = plgk_cli.train(config, tmp_path / "run", progress=False)
    assert manifest["complete"] and plgk_cli.load_run(tmp_path / "run").steps[-1] == manifest["total_steps"]
    summary = plgk_cli.replay(ReplayArguments(ckpts=str(tmp_path / "run"), audit_set="test[:2]",
                                              out=str(tmp_path / "out.h5"), device="cpu"), progress=False)
    with plgk_cli.read_influences(summary.path) as f:
        assert f.influence("loss").shape == (22, 2)
