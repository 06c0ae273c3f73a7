"""Measure the audit on optimizer setups beyond one plain group: parameter groups, per-step
hyper-parameter schedules, frozen-then-unfrozen layers, foreach and fused updates.

    python scripts/exp_optimizers.py                          # every run, 3 epochs, test[:64]
    python scripts/exp_optimizers.py --runs adam-onecycle --epochs 1 --audit-set 'test[:16]'

Each run trains the built-in CNN on digits in float32 through plgk_cli.recorder.Recorder, in a
plain hand-written loop (batch 64, shuffled by a seeded generator), into a temporary directory (or
--workdir), then replays --audit-set on the CPU with each of --rules (default: replay's default
rule, trapezoid, and supersample:4). Every replay is a row of the table (and of --json-out),
marked pass when it meets every bar (update error <= 1e-5, rel. MRE <= 5e-3, LC >= 0.9999); the
exit status is 1 when some run meets them with none of the rules. `measure()` is what
tests/test_exp_optimizers.py calls.

Runs:
  adam-plain       Adam, one group, foreach=False, fixed lr: the baseline the others extend
  adamw-groups     AdamW, weights weight_decay 0.05 and biases 0, LambdaLR with one lambda per group
  sgd-onecycle     SGD momentum 0.9 + OneCycleLR (defaults: cycle_momentum cycles the momentum)
  adam-onecycle    Adam + OneCycleLR (cycle_momentum cycles beta1)
  adam-frozen      Adam, the second convolution frozen (requires_grad_(False), grads set to None)
                   for the first FROZEN_STEPS updates, then trained
  adam-foreach     Adam(foreach=True)
  adam-fused       Adam(fused=True) (torch's CPU fused kernel): does replay's update check pass?
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from plgk_cli.arguments import ReplayArguments
from plgk_cli.data import load_dataset
from plgk_cli.errors import PlgkError
from plgk_cli.models import build_model
from plgk_cli.recorder import Recorder
from plgk_cli.replay import replay

KINDS = ("adam-plain", "adamw-groups", "sgd-onecycle", "adam-onecycle", "adam-frozen", "adam-foreach", "adam-fused")
BATCH_SIZE = 64
FROZEN_STEPS = 10  # adam-frozen: updates 1..FROZEN_STEPS leave the second convolution alone
FROZEN_LAYER = "0.3."  # the second convolution of the built-in cnn (weight and bias)
DEFAULT_RULE = ReplayArguments.__dataclass_fields__["rule"].default  # "trapezoid"
BARS = {"max_update_error": 1e-5, "rmre": 5e-3, "lc": 0.9999}


def _optimizer(kind: str, model: torch.nn.Module, total_steps: int):
    """The optimizer and lr scheduler (or None) of a run."""
    params = list(model.parameters())
    if kind == "adamw-groups":
        weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
        biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
        opt = torch.optim.AdamW([{"params": weights, "weight_decay": 0.05},
                                 {"params": biases, "weight_decay": 0.0}], lr=3e-3, foreach=False)
        decay = lambda t: 1.0 - 0.8 * t / total_steps  # noqa: E731  weights: linear decay to 0.2x
        warm = lambda t: min(1.0, (t + 1) / 5)  # noqa: E731  biases: 5-step warm-up, then flat
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, [decay, warm])
    if kind == "sgd-onecycle":
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, foreach=False)
        return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=total_steps)
    if kind == "adam-onecycle":
        opt = torch.optim.Adam(params, lr=1e-2, foreach=False)
        return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=total_steps)
    if kind in ("adam-plain", "adam-frozen"):
        return torch.optim.Adam(params, lr=3e-3, foreach=False), None
    if kind == "adam-foreach":
        return torch.optim.Adam(params, lr=3e-3, foreach=True), None
    if kind == "adam-fused":
        return torch.optim.Adam(params, lr=3e-3, fused=True), None
    raise ValueError(f"unknown run {kind!r}; expected one of {', '.join(KINDS)}")


def record(kind: str, epochs: int, run_dir: Path) -> float:
    """Train run `kind` for `epochs` epochs through the Recorder into run_dir; seconds taken."""
    data = load_dataset("digits", 0, torch.float32)
    torch.manual_seed(0)
    model = build_model("cnn", {}, data.in_shape, data.num_classes)
    num_train = len(data.y_train)
    total_steps = epochs * math.ceil(num_train / BATCH_SIZE)
    optimizer, scheduler = _optimizer(kind, model, total_steps)
    frozen = [p for n, p in model.named_parameters() if n.startswith(FROZEN_LAYER)] \
        if kind == "adam-frozen" else []
    shuffle = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    with Recorder(str(run_dir), model, optimizer, model_name="cnn", model_kwargs={},
                  dataset=data, batch_size=BATCH_SIZE, epochs=epochs) as recorder:
        step = 0
        for _ in range(epochs):
            for batch in torch.randperm(num_train, generator=shuffle).split(BATCH_SIZE):
                for p in frozen:
                    p.requires_grad_(step >= FROZEN_STEPS)
                optimizer.zero_grad(set_to_none=True)
                logits = model(data.x_train[batch])
                loss = F.cross_entropy(logits, data.y_train[batch])
                loss.backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()  # the recorder kept the values this update used
                recorder.step(batch, loss, logits)
                step += 1
    return time.perf_counter() - start


def passes(row: dict) -> bool:
    return (row.get("error") is None and row["max_update_error"] <= BARS["max_update_error"]
            and row["rmre"] <= BARS["rmre"] and row["lc"] >= BARS["lc"])


def measure(kind: str, epochs: int, audit_set: str, rule: str = DEFAULT_RULE,
            workdir: str | Path = ".") -> dict:
    """Record run `kind` into workdir (once: a later call with the same kind and epochs reuses
    it) and replay `audit_set` with `rule` on the CPU. Returns one row: the completeness of the
    loss (mre, rmre, lc), the worst update error, train and replay seconds; a replay that stops
    (e.g. the update check refusing the run) gives ``error`` and NaN metrics instead."""
    workdir = Path(workdir)
    run_dir = workdir / f"{kind}-e{epochs}"
    timing = workdir / f"{kind}-e{epochs}.train.json"
    if not timing.exists():
        timing.write_text(json.dumps({"train_s": record(kind, epochs, run_dir)}))
    train_s = json.loads(timing.read_text())["train_s"]
    row = {"run": kind, "epochs": epochs, "audit_set": audit_set, "rule": rule, "train_s": train_s}
    with open(run_dir / "manifest.json") as f:
        row["steps"] = json.load(f)["total_steps"]
    start = time.perf_counter()
    try:
        summary = replay(ReplayArguments(
            ckpts=str(run_dir), audit_set=audit_set, rule=rule, device="cpu", overwrite=True,
            out=str(workdir / f"{kind}-e{epochs}-{rule.replace(':', '')}.h5")), progress=False)
    except PlgkError as exc:
        nan = float("nan")
        return row | {"mre": nan, "rmre": nan, "lc": nan, "max_update_error": nan,
                      "replay_s": time.perf_counter() - start, "ratio": nan,
                      "error": f"{type(exc).__name__}: {exc}"}
    replay_s = time.perf_counter() - start
    m = summary.metrics["loss"]
    return row | {"mre": m["mre"], "rmre": m["rmre"], "lc": m["lc"],
                  "max_update_error": summary.max_update_error, "replay_s": replay_s,
                  "ratio": replay_s / train_s, "error": None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="*", default=None, choices=KINDS, help="default: all")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--audit-set", default="test[:64]")
    parser.add_argument("--rules", nargs="*", default=[DEFAULT_RULE, "supersample:4"])
    parser.add_argument("--workdir", default=None, help="keep the runs here (default: a temporary one)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    print(f"bars: update error <= {BARS['max_update_error']:g}, rel. MRE <= {BARS['rmre']:g}, "
          f"LC >= {BARS['lc']:g}; {args.epochs} epochs, batch {BATCH_SIZE}, audit {args.audit_set}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'run':<14} {'steps':>5} {'rule':<14} {'upd. err':>9} {'MRE':>10} {'rel. MRE':>9} "
          f"{'LC':>9} {'train s':>8} {'replay s':>8} {'replay/train':>12}  bars")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for kind in args.runs or KINDS:
            for rule in args.rules:
                row = measure(kind, args.epochs, args.audit_set, rule, workdir)
                row["passes"] = passes(row)
                rows.append(row)
                verdict = "pass" if row["passes"] else "MISS"
                print(f"{kind:<14} {row['steps']:>5} {rule:<14} {row['max_update_error']:>9.1e} "
                      f"{row['mre']:>10.3e} {row['rmre']:>9.2e} {row['lc']:>9.6f} {row['train_s']:>8.2f} "
                      f"{row['replay_s']:>8.2f} {row['ratio']:>12.1f}  {verdict}", flush=True)
                if row["error"]:
                    print(f"    {row['error']}", flush=True)
                if row["error"]:  # a refused run fails the same way with any rule
                    break
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))
    missed = sorted({r["run"] for r in rows} - {r["run"] for r in rows if r["passes"]})
    if missed:
        print(f"no rule met every bar for: {', '.join(missed)}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
