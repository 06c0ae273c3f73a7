"""Record your own PyTorch training loop with plgk's Recorder, then audit it with plgk's replay.

    python scripts/record_own_loop.py --overwrite       # 3 epochs into runs/own, audits test[:16]
    python scripts/record_own_loop.py --epochs 1 --audit-set 'test[:4]' --out /tmp/own --overwrite

--overwrite replaces the run an earlier invocation left in --out, so either command can run
again; without it an existing run directory is refused, as `plgk train` refuses one. The audit,
OUT.h5, is replaced either way.

The loop below is plain PyTorch: your model, a torch optimizer, a torch lr scheduler, gradient
clipping, mean cross-entropy. The Recorder adds three calls (create it, ``clip_grad_norm``,
``step``) and writes the same run directory as `plgk train`.

The model is named by ``module:function`` (``record_own_loop:small_cnn``) because replay rebuilds
it from that name; where you replay, the module must be importable, e.g.

    PYTHONPATH=scripts plgk replay --ckpts runs/own --audit-set 'test[:16]' --out runs/own.h5
    plgk inspect runs/own.h5 --audit 0
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from plgk_cli.arguments import ReplayArguments
from plgk_cli.data import load_dataset
from plgk_cli.errors import PlgkError
from plgk_cli.recorder import Recorder
from plgk_cli.replay import replay
from plgk_cli.store import InfluenceFile
from plgk_cli.trajectory import check_new_run_dir

BATCH_SIZE = 64


def small_cnn(in_shape, num_classes, channels: int = 6) -> nn.Module:
    """The user's model: one convolution, one pooling, one linear layer (no BatchNorm, no dropout:
    the audit needs examples that do not interact inside a batch)."""
    _, height, width = in_shape
    return nn.Sequential(nn.Conv2d(in_shape[0], channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(channels * (height // 2) * (width // 2), num_classes))


def train(out: str, epochs: int, overwrite: bool = False) -> dict:
    data = load_dataset("digits")  # scikit-learn's 8x8 digits, float32, split 80/20
    torch.manual_seed(0)
    model = small_cnn(data.in_shape, data.num_classes)
    # two parameter groups, as transformer recipes build them: weight decay on weights, none on biases
    weights = [p for n, p in model.named_parameters() if not n.endswith("bias")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    optimizer = torch.optim.AdamW([{"params": weights, "weight_decay": 1e-2},
                                   {"params": biases, "weight_decay": 0.0}], lr=3e-3)
    num_train = len(data.y_train)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=epochs * math.ceil(num_train / BATCH_SIZE))
    shuffle = torch.Generator().manual_seed(0)
    with Recorder(out, model, optimizer, model_name="record_own_loop:small_cnn",
                  model_kwargs={"channels": 6}, dataset=data, batch_size=BATCH_SIZE,
                  epochs=epochs, overwrite=overwrite) as recorder:
        for _ in range(epochs):
            for batch in torch.randperm(num_train, generator=shuffle).split(BATCH_SIZE):
                optimizer.zero_grad()
                logits = model(data.x_train[batch])
                loss = F.cross_entropy(logits, data.y_train[batch])
                loss.backward()
                recorder.clip_grad_norm(1.0)  # in place of torch.nn.utils.clip_grad_norm_
                optimizer.step()
                scheduler.step()  # the recorder kept the lr this update used
                recorder.step(batch, loss, logits)
    return recorder.manifest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/own", help="run directory to create (must be new, "
                        "unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run already in --out (only a plgk run directory; once the "
                             "new run is complete)")
    parser.add_argument("--h5", default=None, help="audit output (default: OUT.h5, replaced)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--audit-set", default="test[:16]")
    args = parser.parse_args(argv)
    h5 = args.h5 or args.out.rstrip("/") + ".h5"
    try:
        if not args.overwrite:  # the Recorder would name its own overwrite=True as the fix
            check_new_run_dir(args.out, overwrite_flag="--overwrite", out_name="--out")
        manifest = train(args.out, args.epochs, args.overwrite)
        print(f"recorded {manifest['total_steps']} steps to {args.out}: train loss "
              f"{manifest['final']['train_loss']:.4f}, test accuracy {manifest['final']['test_accuracy']:.4f}")
        summary = replay(ReplayArguments(ckpts=args.out, audit_set=args.audit_set, out=h5, device="cpu",
                                         overwrite=True), progress=False)
        m = summary.metrics["loss"]
        print(f"audit of {args.audit_set}: MRE {m['mre']:.3e}  LC {m['lc']:.6f}  worst update error "
              f"{summary.max_update_error:.2e}; wrote {h5}")
        with InfluenceFile(h5) as f:
            influence = f.influence("loss")[:, 0].astype(np.float64)
            helpful = np.argsort(influence)[:3]  # the loss: most negative = most helpful
            print(f"audit point 0 (test {int(f.audit_index[0])}, label {int(f.audit_label[0])}): most "
                  "helpful training examples " + ", ".join(
                      f"#{int(f.train_index[i])} (label {int(f.train_label[i])}, {influence[i]:+.3e})"
                      for i in helpful))
    except PlgkError as exc:
        print(f"record_own_loop: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
