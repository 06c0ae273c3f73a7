"""Classification: integer class labels, mean cross-entropy over the batch."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from plgk_cli.errors import AuditSpecError
from plgk_cli.tasks import HELPFUL_DOWN, HELPFUL_UP, TRUE_CLASS_UP, Task


MAX_CLASSES = 1 << 24  # a label of 10**12 would ask for an output layer of 10**12 columns


class Classification(Task):
    name = "classification"
    targets = ("loss", "logit", "margin", "logits")
    label_kind = "class"
    helpful_directions = {"loss": HELPFUL_DOWN, "logit": HELPFUL_UP, "margin": HELPFUL_UP, "logits": TRUE_CLASS_UP}
    output_shape = "(batch, classes)"

    def check_labels(self, y, where: str) -> torch.Tensor:
        y = np.asarray(y)
        if not np.issubdtype(y.dtype, np.integer):
            if not np.issubdtype(y.dtype, np.number) or np.issubdtype(y.dtype, np.complexfloating):
                raise ValueError(f"{where} must hold integer class labels, not {y.dtype}")
            whole = np.isfinite(y) & (y == np.round(y))
            if whole.all():
                raise ValueError(f"{where} must hold integer class labels, not {y.dtype}: use "
                                 "y.astype(numpy.int64)")
            index = _first(~whole)
            raise ValueError(f"{where} must hold integer class labels; {where}[{index}] is {float(y[index])} "
                             '(real-valued targets: [task] name = "regression")')
        if y.ndim == 2 and y.shape[1] == 1:
            raise ValueError(f"{where} has shape {y.shape}; class labels must be 1-D integers: use "
                             "y.reshape(-1)")
        if y.ndim != 1:
            raise ValueError(f"{where} has shape {y.shape}; class labels are one integer per row (N,)")
        if len(y) and y.min() < 0:
            index = _first(y < 0)
            raise ValueError(f"{where} has negative labels: {where}[{index}] is {int(y[index])}; class "
                             "labels are 0, 1, ..., classes - 1")
        if len(y) and int(y.max()) >= MAX_CLASSES:  # compared before the cast: uint64 may not fit int64
            index = _first(y >= MAX_CLASSES)
            raise ValueError(f"{where}[{index}] is label {int(y[index])}, which would make {int(y[index]) + 1} "
                             f"classes; plgk takes at most {MAX_CLASSES} (labels 0..{MAX_CLASSES - 1}): "
                             "number the classes from 0")
        return torch.as_tensor(y, dtype=torch.int64)

    def output_width(self, y_train, y_test):
        return int(max(int(y_train.max()), int(y_test.max()) if len(y_test) else 0)) + 1

    def output_problem(self, output, width):
        if output.dim() != 2:
            return f"returned shape {tuple(output.shape)}; classification needs {self.output_shape}"
        if output.shape[1] < width:
            return (f"returned {output.shape[1]} columns for {width} classes; its output layer needs "
                    f"num_classes ({width}) columns")
        return None

    def loss_terms(self, output, y):
        return F.cross_entropy(output, y, reduction="none")

    def batch_loss(self, output, y):
        return F.cross_entropy(output, y)

    def target_width(self, target, output_width, label_shape=()):
        """Refuses (AuditSpecError) ``margin`` on a run with one class: there is no other class."""
        if target == "margin" and output_width < 2:
            raise AuditSpecError(f"--target margin: needs at least 2 classes; the run has {output_width}")
        return output_width if target == "logits" else 1

    def audited(self, output, y, targets):
        """``margin`` is the true-class logit minus the best other logit at this θ."""
        true_logit = output.gather(1, y[:, None])
        columns = []
        for t in targets:
            if t == "loss":
                columns.append(self.loss_terms(output, y)[:, None])
            elif t == "logit":
                columns.append(true_logit)
            elif t == "margin":
                is_true = torch.arange(output.shape[1], device=output.device) == y[:, None]
                other = torch.where(is_true, torch.full_like(output, -torch.inf), output).amax(1, keepdim=True)
                columns.append(true_logit - other)
            elif t == "logits":
                columns.append(output)
        return torch.cat(columns, 1)

    def correct(self, output, y):
        return int((output.detach().argmax(1).cpu() == y.cpu()).sum())


def _first(where: np.ndarray) -> int | tuple:
    """The index of the first True of a boolean array (an int for 1-D, a tuple otherwise)."""
    index = tuple(int(i) for i in np.argwhere(where)[0])
    return index[0] if len(index) == 1 else index
