"""Shared fixtures: a tiny random dataset and tiny recorded runs that train in well under a second."""

from __future__ import annotations

import importlib.util
import sys

from pathlib import Path

import numpy as np
import pytest
import torch

from plgk_cli.config import parse_config
from plgk_cli.train import train

# The fixtures' models are tiny: one thread is faster than two, and on a 2-core machine shared with
# anything else two threads per process contend (a BatchNorm replay test took 8 s with one thread
# and 133 s with two while another process kept a core busy).
torch.set_num_threads(1)


def write_tiny_npz(path: Path, n_train: int = 22, n_test: int = 6, features: int = 6,
                   classes: int = 3, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(path, x_train=rng.normal(size=(n_train, features)),
             y_train=rng.integers(0, classes, n_train),
             x_test=rng.normal(size=(n_test, features)), y_test=rng.integers(0, classes, n_test))
    return path


def tiny_config(npz: Path, optim: dict, dtype: str = "float64", epochs: int = 2, batch_size: int = 8,
                model: dict | None = None, **train) -> dict:
    """The run configuration (a dict, as parse_config takes it) of a tiny MLP on ``npz``; ``train``:
    more [train] keys."""
    return {"data": {"dataset": f"npz:{npz}"},
            "model": model or {"name": "mlp", "kwargs": {"hidden": 6}},
            "optim": optim,
            "train": {"epochs": epochs, "batch_size": batch_size, "seed": 0, "dtype": dtype, **train}}


def train_tiny(out: Path, npz: Path, optim: dict, schedule: dict | None = None,
               dtype: str = "float64", epochs: int = 2, batch_size: int = 8,
               model: dict | None = None) -> Path:
    config = tiny_config(npz, optim, dtype, epochs, batch_size, model, device="cpu")
    if schedule:
        config["schedule"] = schedule
    train(parse_config(config), out, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory) -> Path:
    return write_tiny_npz(tmp_path_factory.mktemp("data") / "tiny.npz")


def load_script(name: str):
    """scripts/<name>.py as a module (the scripts are not a package), imported once."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
