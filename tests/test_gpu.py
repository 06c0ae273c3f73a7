"""CUDA checks (every test is skipped where torch sees no CUDA device; scripts/gpu_check.sh runs
this file first on a GPU machine).

(a) the digits demo and (b) the LM demo, shortened, trained once on the CPU and replayed on the CPU
and on CUDA from the same checkpoints: influence, residual and MRE agree to 1e-6 relative. The
copies train in float64: in float32 the two devices' kernels round differently (and cuDNN's
convolutions may run in TF32), so agreement to 1e-6 is only a float64 property; the float32 runs
as they are configured are compared, with their figures printed, by gpu_check.sh's loop.

(c) the Recorder's CUDA generator capture: a gpt with dropout trained on CUDA (float32) records the
CUDA generator's state before each training forward; replay on CUDA re-draws the same dropout masks,
so its update check passes (worst update error <= 1e-5), and a forward from the recorded state
gives the recorded batch loss, while one from another CUDA state does not.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import load_script
from plgk_cli.arguments import ReplayArguments
from plgk_cli.config import load_config
from plgk_cli.gradients import restored_rng
from plgk_cli.replay import replay
from plgk_cli.run import load_run
from plgk_cli.store import InfluenceFile
from plgk_cli.train import train

ROOT = Path(__file__).resolve().parent.parent
DEVICE = "cuda"  # the device under test; the reference replay runs on the CPU
REL = 1e-6  # float64 runs: the devices' replays agree far below this
LM_TARGET = "sequence-logprob"

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device (torch.cuda.is_available() is False)")


def _shortened(name: str, tmp_path: Path, epochs: int, **train_keys) -> Path:
    """configs/<name>.toml with [train] epochs = ``epochs`` and the other [train] keys set, as a copy
    in ``tmp_path`` (the text edited, so that everything else stays as the config has it)."""
    text = (ROOT / "configs" / f"{name}.toml").read_text()
    original = tomllib.loads(text)
    assert not set(train_keys) & set(original["train"]), "the edit below only adds keys"
    text, n = re.subn(r"(?m)^epochs\s*=\s*\d+\s*$", f"epochs = {epochs}", text)
    assert n == 1, f"configs/{name}.toml: expected one epochs line"
    added = "".join(f'{k} = "{v}"\n' for k, v in train_keys.items())
    text, n = re.subn(r"(?m)^\[train\]\s*$", "[train]\n" + added.rstrip("\n"), text)
    assert n == 1, f"configs/{name}.toml: expected one [train] table"
    path = tmp_path / f"{name}-{'-'.join(map(str, train_keys.values()))}.toml"
    path.write_text(text)
    edited = tomllib.loads(text)
    assert edited["train"] == {**original["train"], "epochs": epochs, **train_keys}
    assert {k: v for k, v in edited.items() if k != "train"} == \
        {k: v for k, v in original.items() if k != "train"}
    return path


def _train(config: Path, out: Path) -> Path:
    train(load_config(config), out, progress=False)
    return out


def _replay(run_dir: Path, audit_set: str, out: Path, device: str, targets=("loss",)):
    args = ReplayArguments(ckpts=str(run_dir), audit_set=audit_set, out=str(out), device=device,
                           targets=tuple(targets), rule="trapezoid", overwrite=True)
    return replay(args, progress=False)


def _prompts(tmp_path: Path) -> Path:
    out = tmp_path / "prompts.jsonl"
    load_script("demo_lm").write_prompts(out, 0)
    return out


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-300))


def _same_audit(run_dir: Path, audit_set: str, tmp_path: Path, target: str) -> None:
    """Replay ``run_dir`` on the CPU and on DEVICE; the two files must agree to REL."""
    files, summaries = [], []
    for side, device in (("reference", "cpu"), ("tested", DEVICE)):
        files.append(tmp_path / f"{run_dir.name}-{side}-on-{device.replace(':', '')}.h5")
        summaries.append(_replay(run_dir, audit_set, files[-1], device, targets=(target,)))
    with InfluenceFile(files[0]) as a, InfluenceFile(files[1]) as b:
        assert b.arguments["device"] == DEVICE
        x, y = a.influence(target), b.influence(target)
        assert x.shape == y.shape and np.abs(x).max() > 0  # a real signal: the comparison has teeth
        assert _rel(x, y) <= REL, ("influence", _rel(x, y))
        ra, rb = a.array(target, "residual"), b.array(target, "residual")
        assert _rel(ra, rb) <= REL or np.abs(ra - rb).max() <= REL * np.abs(a.array(target, "final")
                                                                       - a.array(target, "initial")).max()
        for name in ("initial", "final"):
            assert _rel(a.array(target, name), b.array(target, name)) <= REL, name
        ma, mb = a.metrics(target), b.metrics(target)
        assert ma["mre"] > 0 and abs(ma["mre"] - mb["mre"]) <= REL * ma["mre"], (ma, mb)
        assert abs(ma["lc"] - mb["lc"]) <= REL, (ma["lc"], mb["lc"])
    for summary in summaries:  # both passed float64's update check (replay raises otherwise)
        assert summary.max_update_error <= 1e-8


def test_digits_demo_replays_alike_on_cpu_and_cuda(tmp_path):
    run = _train(_shortened("demo", tmp_path, 2, dtype="float64", device="cpu"), tmp_path / "digits")
    _same_audit(run, "test[:64]", tmp_path, "loss")


def test_lm_demo_replays_alike_on_cpu_and_cuda(tmp_path):
    run = _train(_shortened("lm_addition", tmp_path, 2, dtype="float64", device="cpu"), tmp_path / "lm")
    _same_audit(run, str(_prompts(tmp_path)), tmp_path, LM_TARGET)


def test_gpt_trained_on_cuda_replays_its_dropout_masks(tmp_path):
    config = _shortened("lm_addition", tmp_path, 1, device=DEVICE)  # float32, dropout 0.1 as configured
    assert load_config(config).model.kwargs["dropout"] > 0
    run_dir = _train(config, tmp_path / "gpt-cuda")
    run = load_run(run_dir)
    assert run.manifest["forward"]["random"] and run.faithful  # the forward drew random numbers
    generator = torch.device(DEVICE).type  # dropout on DEVICE draws from this generator ("cuda")

    summary = _replay(run_dir, str(_prompts(tmp_path)), tmp_path / "gpt-cuda.h5", DEVICE, targets=(LM_TARGET,))
    assert summary.max_update_error <= 1e-5, summary.max_update_error
    assert summary.metrics[LM_TARGET]["lc"] > 0.99

    # The recorded generator states reproduce the recorded batch losses; other states do not.
    device = torch.device(DEVICE)
    model = run.build_model().to(device=device, dtype=run.dtype).train()
    data = run.dataset
    x, y = data.x_train.to(device), data.y_train.to(device)

    def batch_loss(t: int, states: dict) -> float:
        model.load_state_dict(run.checkpoint(t).params, strict=False)
        batch = run.checkpoint(t + 1).batch.to(device)
        with restored_rng(states, device):
            return float(run.loss_fn(model(x[batch]), y[batch]).detach())

    last = run.steps[-1] - 1
    for t in (0, last // 2, last):
        record = run.checkpoint(t + 1)
        assert generator in record.rng, sorted(record.rng)  # the Recorder captured DEVICE's generator
        assert batch_loss(t, record.rng) == pytest.approx(record.loss, rel=1e-6, abs=0), t
        # without the device generator's recorded state (left where it stands): other dropout masks
        others = {k: v for k, v in record.rng.items() if k != generator}
        changed = batch_loss(t, others)
        assert abs(changed - record.loss) > 1e-5 * abs(record.loss), (t, changed, record.loss)
        # another update's recorded state: other masks too
        other = run.checkpoint(t if t > 0 else t + 2).rng
        assert abs(batch_loss(t, other) - record.loss) > 1e-5 * abs(record.loss), t
