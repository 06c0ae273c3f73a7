"""Errors a user can cause. The CLI turns each into one line and the class's exit code."""


class PlgkError(Exception):
    """Base class: the message says what is wrong, where, and how to fix it."""

    exit_code = 1


class ConfigError(PlgkError):
    exit_code = 2


class DataError(PlgkError):
    exit_code = 3


class TrajectoryError(PlgkError):
    exit_code = 4


class AuditSpecError(PlgkError):
    exit_code = 5


class OutputError(PlgkError):
    exit_code = 6


class StoreError(PlgkError):
    """An influences.h5 that cannot be read as one."""

    exit_code = 7
