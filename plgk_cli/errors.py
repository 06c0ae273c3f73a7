"""Errors a user can cause. The CLI turns each into one line and the class's exit code.

Codes start at 10 so that they never collide with click's usage errors (2) or an unexpected
exception (1).
"""


class PlgkError(Exception):
    """Base class: the message says what is wrong, where, and how to fix it."""

    exit_code = 1


class ConfigError(PlgkError):
    exit_code = 10


class DataError(PlgkError):
    exit_code = 11


class TrajectoryError(PlgkError):
    exit_code = 12


class AuditSpecError(PlgkError):
    exit_code = 13


class OutputError(PlgkError):
    exit_code = 14


class StoreError(PlgkError):
    """An influences.h5 that cannot be read as one."""

    exit_code = 15


class RecorderError(PlgkError):
    """A training loop that broke the Recorder's protocol (plgk_cli/recorder.py): a recorded
    trajectory would not describe the updates that actually ran."""

    exit_code = 16


class DependencyError(PlgkError):
    """An optional package that the requested feature needs is not installed."""

    exit_code = 17


class UpdateCheckError(PlgkError):
    """Replay re-derived an update from the per-example gradients and the optimizer's recorded
    state, and it differs from the recorded update: the audit would not describe this run."""

    exit_code = 18


class UserCodeError(PlgkError):
    """The user's own code (a model builder ``pkg.mod:fn``, a ``py:`` dataset, a custom model's
    forward) raised: the message names the user's file and line and the exception."""

    exit_code = 19


class NonFiniteError(PlgkError):
    """A NaN or Inf where a finite number is needed: a diverged training step, a non-finite audit
    quantity."""

    exit_code = 20


class Interrupted(PlgkError):
    """Stopped by SIGINT/SIGTERM after committing progress."""

    exit_code = 130
