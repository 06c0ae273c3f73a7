"""Tasks: the one place that knows what a training example is (DESIGN.md v2, "Tasks").

A task states how a batch's loss is built from per-example terms, L_B = Σ_{m∈B} w_m ℓ_m, and
which quantities q_n of an audit point can be audited. Everything downstream (training, the
per-example gradients, the decomposition c_s w_m g_{m,s}, the store) asks the task instead of
assuming cross-entropy over class labels.

Built in: ``classification`` (integer class labels, mean cross-entropy; targets loss, logit,
margin, logits), ``regression`` (float targets of any shape, mean squared error; targets loss,
output) and ``language-model`` (token sequences, next-token cross-entropy weighted per token as
Hugging Face does; targets loss, sequence-logprob, token-losses). ``py:package.module:Name`` names the user's own: a :class:`Task` subclass (or instance).
"""

from __future__ import annotations

import contextlib

import torch

from plgk_cli.errors import ConfigError
from plgk_cli.importing import import_object, user_code


# Which way of an audited quantity is better for the audit point. The stored `sign` attribute,
# `plgk inspect` and the plots all take their words from these, so a target's sign is stated once.
HELPFUL_DOWN = "down"  # a loss: a training example that lowered it helped
HELPFUL_UP = "up"  # a log-probability, a true-class logit, a margin: one that raised it helped
NO_HELPFUL = "none"  # e.g. a regression output: it was raised or lowered, neither is better
TRUE_CLASS_UP = "true-class-up"  # logits: up in the audit point's own class, down in every other
DIRECTIONS = (HELPFUL_DOWN, HELPFUL_UP, NO_HELPFUL, TRUE_CLASS_UP)


def column_direction(direction: str, column: int | None = None, label=None) -> str:
    """The direction of one audited column: TRUE_CLASS_UP resolved against the audit point's class."""
    if direction != TRUE_CLASS_UP:
        return direction
    return HELPFUL_UP if column is not None and label is not None and int(column) == int(label) else HELPFUL_DOWN


def quantity_name(target: str, column: int | str | None = None) -> str:
    """One audited column in words: "margin", "logit of class 3", "loss at position 5" (``column``
    may be a letter: "logit of class c")."""
    if column is None:
        return target
    if target == "logits":
        return f"logit of class {column}"
    return f"loss at position {column}" if target == "token-losses" else f"{target} {column}"


def sign_sentence(direction: str, what: str, own_class: str = "the audit point's own class") -> str:
    """What the sign of an influence on ``what`` (e.g. "margin", "logit of class 3") means, in words;
    ``own_class`` names the column a TRUE_CLASS_UP target helps by going up."""
    if direction == HELPFUL_DOWN:
        return (f"influence < 0 pushed the {what} down: helpful, a lower {what} is better for the audit "
                f"point; > 0 pushed it up: harmful")
    if direction == HELPFUL_UP:
        return (f"influence > 0 pushed the {what} up: helpful, a higher {what} is better for the audit "
                f"point; < 0 pushed it down: harmful")
    if direction == TRUE_CLASS_UP:
        return (f"influence > 0 pushed the {what} up, < 0 pushed it down; helpful = up for {own_class}, "
                f"down for every other class")
    return (f"influence > 0 pushed the {what} up, < 0 pushed it down; neither is helpful or harmful: "
            f"no direction of the {what} is better for the audit point")


class Task:
    """The protocol. Subclass it and override what differs; ``name`` is what the manifest stores.

    ``targets``: the audited quantities it offers; ``helpful_directions``: which way of each one is
    better for the audit point (what `inspect` calls helpful). ``loss_terms`` and ``audited`` are evaluated on the model's output for a batch
    and must treat the rows independently (row m depends only on output row m and target m).
    """

    name = "task"
    targets: tuple = ("loss",)
    label_kind = "float"  # "class" (integer labels), "float" or "tokens" (next-token ids): how datasets hand y over
    # target -> the direction that helps the audit point (one of DIRECTIONS); a target not named
    # here has none (NO_HELPFUL): inspect then ranks by raised / lowered, not helpful / harmful
    helpful_directions: dict = {"loss": HELPFUL_DOWN}
    output_shape = "(batch, ...)"  # the model's output in words, for the messages that refuse another

    def output_problem(self, output: torch.Tensor, width: int) -> str | None:
        """What is wrong with the shape of a model's output (batch first) for this task with an
        output ``width`` (output_width's), as the end of "[model] name: NAME ...", or None."""
        return None

    def check_labels(self, y, where: str) -> torch.Tensor:
        """The split's targets as the task uses them; raises ValueError with what is wrong."""
        return torch.as_tensor(y)

    def output_width(self, y_train: torch.Tensor, y_test: torch.Tensor) -> int:
        """The width the model's output must have (passed to builders as ``num_classes``)."""
        raise NotImplementedError

    def loss_terms(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """ℓ_m for every row of the batch (B,)."""
        raise NotImplementedError

    def weights(self, y: torch.Tensor) -> torch.Tensor | None:
        """w_m (B,) with L_B = Σ w_m ℓ_m; None for the plain mean over examples (w_m = 1/|B|)."""
        return None

    def batch_loss(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training loss L_B = Σ_m w_m ℓ_m (what `plgk train` backpropagates)."""
        terms = self.loss_terms(output, y)
        w = self.weights(y)
        return terms.mean() if w is None else (w.to(terms.dtype) * terms).sum()

    def target_width(self, target: str, output_width: int, label_shape: tuple = ()) -> int:
        """Audited quantities per audit point that ``target`` contributes."""
        return 1

    def audited(self, output: torch.Tensor, y: torch.Tensor, targets: tuple) -> torch.Tensor:
        """The audited quantities of a batch (B x Q), targets stacked in order."""
        raise NotImplementedError

    def helpful_direction(self, target: str) -> str:
        """Which way of ``target`` is better for the audit point (one of DIRECTIONS)."""
        direction = self.helpful_directions.get(target, NO_HELPFUL)
        return direction if direction in DIRECTIONS else NO_HELPFUL

    def correct(self, output: torch.Tensor, y: torch.Tensor) -> int | None:
        """How many rows the model gets right (None where accuracy means nothing)."""
        return None


def _builtin() -> dict:
    from plgk_cli.tasks.classification import Classification
    from plgk_cli.tasks.language_model import LanguageModel
    from plgk_cli.tasks.regression import Regression

    return {"classification": Classification, "regression": Regression, "language-model": LanguageModel}


BUILTIN_TASKS = ("classification", "regression", "language-model")


def builtin_targets() -> tuple:
    """Every target a built-in task offers, each once, in the tasks' order."""
    return tuple(dict.fromkeys(t for task in _builtin().values() for t in task.targets))


def known_direction(task_name: str, target: str) -> str:
    """``target``'s direction without importing a py: task (files written before the direction was
    stored): the built-in task's, else that of the built-in target of the same name, else none."""
    builtin = _builtin()
    if task_name in builtin:
        return builtin[task_name]().helpful_direction(target)
    for task in builtin.values():
        if target in task.targets:
            return task().helpful_direction(target)
    return NO_HELPFUL


def task_code(task: Task, method: str):
    """A context for a call of ``task.method``: a py: task's own method raising is a
    UserCodeError; the built-in tasks get no such boundary (their failing is plgk's bug)."""
    module = type(task).__module__
    if module == "plgk_cli" or module.startswith("plgk_cli."):
        return contextlib.nullcontext()
    return user_code(f"[task] name: {task.name}'s {method} raised")


def task_for(name: str) -> Task:
    """The task named ``name``: a built-in one or ``py:package.module:Name``."""
    builtin = _builtin()
    if name in builtin:
        return builtin[name]()
    if not name.startswith("py:") or ":" not in name[3:]:
        raise ConfigError(f"[task] name: unknown task {name!r}; expected one of "
                          f"{', '.join(BUILTIN_TASKS)} or py:package.module:Name")
    try:
        obj = import_object(name[3:], f"[task] name {name}")
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"[task] name: cannot import {name[3:]!r} ({type(exc).__name__}: {exc}); give "
                          "package.module:Name importable from the working directory") from None
    if isinstance(obj, type):
        with user_code(f"[task] name: {name[3:]}() raised"):
            task = obj()
    else:
        task = obj
    if not isinstance(task, Task):
        raise ConfigError(f"[task] name: {name[3:]} is {type(task).__name__}, not a plgk_cli.tasks.Task; "
                          "subclass Task (docs/tasks.md)")
    task.name = name
    return task
