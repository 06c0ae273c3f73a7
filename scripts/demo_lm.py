"""The LM demo's two ends (`make demo-lm`): the audit prompts, and whether the planted wrong
answers are found among the most harmful training sequences for the prompts they resemble.

    python scripts/demo_lm.py prompts OUT.jsonl [--seed 0]
    python scripts/demo_lm.py report INFLUENCES.h5 [--top 10]

``prompts`` writes, for each of the addition corpus's planted rows "a+b=<wrong>", two prompts it
resembles, each continued by the true answer: the held-out commuted problem "b+a=" (its twin) and
its own problem "a+b=" (which training saw only with the wrong answer); then a few other held-out
problems as controls. ``report`` ranks, for every prompt, the training sequences by their
influence on the continuation's log-probability (most harmful first) and says where the planted
rows stand: for their twin, for their own problem, and for the controls.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from plgk_cli.data import addition_corpus
from plgk_cli.store import InfluenceFile

TARGET = "sequence-logprob"


CONTROLS = 4


def prompt_problems(corpus) -> tuple:
    """(problem "a+b", true answer) of the twins, the planted rows' own problems, the controls."""
    def solved(a, b):
        return f"{a}+{b}", str(int(a) + int(b))

    operands = [line.split("=")[0].split("+") for line in corpus.train]
    twins = [solved(*operands[p][::-1]) for p in corpus.planted]
    own = [solved(*operands[p]) for p in corpus.planted]
    controls = [corpus.test[i].split("=") for i in range(len(corpus.test)) if i not in corpus.twins][:CONTROLS]
    return tuple(twins), tuple(own), tuple(map(tuple, controls))


def write_prompts(out: Path, seed: int) -> None:
    twins, own, controls = prompt_problems(addition_corpus(seed))
    with open(out, "w", encoding="utf-8") as f:
        for problem, answer in (*twins, *own, *controls):
            f.write(json.dumps({"prompt": problem + "=", "continuation": answer + "\n"}) + "\n")
    print(f"wrote {out}: {len(twins)} held-out prompts commuting a planted row, the {len(own)} planted "
          f"problems with their true answers, {len(controls)} held-out controls")


def report(path: Path, top: int, seed: int) -> None:
    corpus = addition_corpus(seed)
    with InfluenceFile(path) as f:
        influence = np.asarray(f.influence(TARGET), dtype=np.float64)  # (train rows, prompts)
        rows = np.asarray(f.train_index)
        metrics = f.metrics(TARGET)
        initial, final = (np.asarray(f.array(TARGET, k), dtype=np.float64) for k in ("initial", "final"))
    twins, own, controls = prompt_problems(corpus)
    planted = [int(np.nonzero(rows == p)[0][0]) for p in corpus.planted]
    harm_rank = np.argsort(np.argsort(influence, axis=0, kind="stable"), axis=0, kind="stable") + 1  # 1 = most harmful
    n = len(planted)
    print(f"the model's probability of the true answer and its closing newline, mean over the {len(final)} prompts: "
          f"{np.exp(initial).mean():.2e} at θ_0, {np.exp(final).mean():.3f} after training")
    print(f"completeness of {TARGET}: rel. MRE {metrics['rmre']:.2e}, LC {metrics['lc']:.6f}, "
          f"worst update error {metrics['max_update_error']:.1e}")
    print(f"planted wrong answers: the rank of each among the {len(rows)} training sequences (1 = most "
          f"harmful) for its commuted twin (held out) and for its own problem, both with the true answer")
    for k, (p, row) in enumerate(zip(corpus.planted, planted)):
        print(f"  {corpus.train[p]!r:>11}: twin {twins[k][0] + '=' + twins[k][1]!r:>11} rank {harm_rank[row, k]:>4} "
              f"({influence[row, k]:+.2e}); own {own[k][0] + '=' + own[k][1]!r:>11} rank "
              f"{harm_rank[row, n + k]:>4} ({influence[row, n + k]:+.2e})")
    for name, columns in (("twin", range(n)), ("own problem", range(n, 2 * n))):
        ranks = [int(harm_rank[row, c]) for row, c in zip(planted, columns)]
        print(f"{name}: found among the {top} most harmful {sum(r <= top for r in ranks)} of {n} times; "
              f"median rank {np.median(ranks):.0f}")
    control = harm_rank[planted][:, 2 * n:]
    print(f"controls ({control.shape[1]} other held-out prompts): median rank of the planted rows "
          f"{np.median(control):.0f} (chance: {(len(rows) + 1) / 2:.0f} of {len(rows)})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prompts")
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("report")
    r.add_argument("influences", type=Path)
    r.add_argument("--top", type=int, default=10)
    r.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "prompts":
        write_prompts(args.out, args.seed)
    else:
        report(args.influences, args.top, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
