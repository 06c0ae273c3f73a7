"""Fault injection for the resume tests, inert unless PLGK_FAULT is set.

PLGK_FAULT=POINT:K[:HOW] acts right after the K-th time the process passes POINT
(``before_commit`` / ``after_commit``: a replay progress commit, before anything of it is written
or once it is in place; ``after_checkpoint``: a training checkpoint), HOW
being KILL (SIGKILL: no cleanup, like a power cut; the default), TERM or INT (a signal the command
handles) or CRASH (an unexpected exception). PLGK_FAULT_RANK=R limits it to torchrun's rank R.
"""

from __future__ import annotations

import os
import signal

from plgk_cli.errors import ConfigError


HOWS = ("KILL", "TERM", "INT", "CRASH")


def fault_hook(point: str) -> None:
    spec = os.environ.get("PLGK_FAULT", "").split(":")
    if spec[0] != point:
        return
    if os.environ.get("PLGK_FAULT_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        return
    how = spec[2] if len(spec) > 2 else "KILL"
    if len(spec) not in (2, 3) or not spec[1].isdigit() or how not in HOWS:
        raise ConfigError(f"PLGK_FAULT: {os.environ['PLGK_FAULT']!r}; expected POINT:K[:HOW] with K a whole "
                          f"number and HOW one of {', '.join(HOWS)} (a test hook: unset it)")
    count = int(os.environ.get("PLGK_FAULT_COUNT", "0")) + 1
    os.environ["PLGK_FAULT_COUNT"] = str(count)
    if count != int(spec[1]):
        return
    if how == "CRASH":
        raise RuntimeError("injected crash (PLGK_FAULT)")
    os.kill(os.getpid(), getattr(signal, "SIG" + how))
