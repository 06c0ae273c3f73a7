"""Regression: float targets of any shape per example, mean squared error.

With targets y of shape (N, *S) the model outputs (B, prod(S)) (or (B, *S)); ℓ_m is the mean over
the example's prod(S) squared errors, so that the batch mean of ℓ_m is torch's ``mse_loss`` over
the whole batch.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from plgk_cli.tasks import HELPFUL_DOWN, NO_HELPFUL, Task


class Regression(Task):
    name = "regression"
    targets = ("loss", "output")
    # an output is better raised for one audit point and lowered for another (it depends on which
    # side of its target it lies): only the loss says which training examples helped
    helpful_directions = {"loss": HELPFUL_DOWN, "output": NO_HELPFUL}
    output_shape = "(batch, outputs)"

    def check_labels(self, y, where: str) -> torch.Tensor:
        y = np.asarray(y)
        if not np.issubdtype(y.dtype, np.number) or np.issubdtype(y.dtype, np.complexfloating):
            raise ValueError(f"{where} must hold real-valued regression targets")
        if y.ndim == 0:
            raise ValueError(f"{where} must have one row per example")
        finite = np.isfinite(y.astype(np.float64))
        if not finite.all():
            index = tuple(int(i) for i in np.argwhere(~finite)[0])
            raise ValueError(f"{where} holds NaN or Inf: {where}[{', '.join(map(str, index))}] is "
                             f"{float(y[index])}; fix or drop example {index[0]}")
        return torch.as_tensor(y.astype(np.float64))

    def output_width(self, y_train, y_test):
        return math.prod(y_train.shape[1:])

    def output_problem(self, output, width):
        # A narrower or wider output would broadcast against the targets: a loss, but a wrong one.
        values = output[0].numel() if len(output) else width
        if values != width:
            return (f"returned {values} values per example for targets of {width}; its output layer needs "
                    f"num_classes ({width}) outputs")
        return None

    def _rows(self, output, y):
        return output.reshape(len(output), -1), y.reshape(len(y), -1).to(output.dtype)

    def loss_terms(self, output, y):
        out, target = self._rows(output, y)
        return (out - target).square().mean(1)

    def target_width(self, target, output_width, label_shape=()):
        return output_width if target == "output" else 1

    def audited(self, output, y, targets):
        out, _ = self._rows(output, y)
        return torch.cat([self.loss_terms(output, y)[:, None] if t == "loss" else out for t in targets], 1)
