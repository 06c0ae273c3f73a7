"""Measure the audit's fidelity on the shipped configs: MRE, LC and the update check per rule.

    python scripts/fidelity.py                      # every config in configs/, trapezoid/euler/supersample:2
    python scripts/fidelity.py --configs demo --rules trapezoid --dtype float64

Trains each config into a temporary directory, replays `--audit-set` with each rule, and prints
one table (also written as JSON with --json-out).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

from plgk_cli.arguments import ReplayArguments
from plgk_cli.config import load_config
from plgk_cli.replay import replay
from plgk_cli.train import train

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="*", default=None, help="names in configs/ (default: all)")
    parser.add_argument("--rules", nargs="*", default=["trapezoid", "euler", "supersample:2"])
    parser.add_argument("--audit-set", default="test[:64]")
    parser.add_argument("--dtype", choices=["float32", "float64"], default=None,
                        help="override [train] dtype")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()
    names = args.configs or sorted(p.stem for p in (ROOT / "configs").glob("*.toml"))
    rows = []
    print(f"{'config':<20} {'dtype':<8} {'rule':<14} {'MRE':>10} {'rel. MRE':>9} {'LC':>9} "
          f"{'upd. err':>9} {'train s':>8} {'replay s':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            config = load_config(ROOT / "configs" / f"{name}.toml")
            if args.dtype:
                config = dataclasses.replace(config, train=dataclasses.replace(config.train, dtype=args.dtype))
            run_dir = Path(tmp) / name
            start = time.perf_counter()
            train(config, run_dir, progress=False)
            train_s = time.perf_counter() - start
            for rule in args.rules:
                start = time.perf_counter()
                summary = replay(ReplayArguments(ckpts=str(run_dir), audit_set=args.audit_set,
                                                 out=str(Path(tmp) / f"{name}-{rule}.h5"), rule=rule),
                                 progress=False)
                replay_s = time.perf_counter() - start
                m = summary.metrics["loss"]
                row = {"config": name, "dtype": config.train.dtype, "rule": rule, **m,
                       "max_update_error": summary.max_update_error, "train_s": train_s,
                       "replay_s": replay_s}
                rows.append(row)
                print(f"{name:<20} {row['dtype']:<8} {rule:<14} {m['mre']:>10.3e} {m['rmre']:>9.2e} "
                      f"{m['lc']:>9.6f} {summary.max_update_error:>9.1e} {train_s:>8.1f} {replay_s:>8.1f}",
                      flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
