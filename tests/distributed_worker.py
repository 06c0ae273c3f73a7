"""Run under torchrun by tests/test_distributed.py: several replays in one process group.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_worker.py SPECS.json

SPECS.json is a list of ReplayArguments keyword dicts (and "row_exchange": gloo to take the
process group's all-gather where shared memory would serve); each replay runs in turn on every
rank, in the group this script opens (replay() leaves a group it did not open in place), which
spares the tests a torchrun start per replay. Each rank writes what its summary says of the
replay beside the output, OUT.rankR.json.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from plgk_cli.arguments import ReplayArguments
from plgk_cli.replay import replay


def main(specs_path: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    try:
        for spec in json.loads(open(specs_path).read()):
            os.environ["PLGK_ROW_EXCHANGE"] = spec.pop("row_exchange", "")
            summary = replay(ReplayArguments(**spec), progress=False)
            # a file per rank: the ranks' lines on one stdout can interleave
            with open(f"{spec['out']}.rank{summary.rank}.json", "w") as f:
                json.dump({"sharding": summary.sharding, "row_share": summary.row_share}, f)
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
